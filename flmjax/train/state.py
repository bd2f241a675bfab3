"""The train state as plain pytrees: fp32 params (a pure dict), optimizer state, and their
shardings from the params' logical `axes` metadata through flmjax.sharding's rules.

With `TrainConfig.lora`, the trained params are the LoRA adapters only (flmjax.model.lora) and
the frozen base is a separate pytree in `LoraConfig.base_dtype`: it gets no gradient and no
optimizer state, and the step reads it as an argument it does not donate."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.model import int8
from flmjax.model import lora as lora_lib
from flmjax.model.flm import FLMAudio, abstract, create
from flmjax.model.transforms import build_base
from flmjax.train.config import OptimConfig, TrainConfig

Params = dict  # nested {'backbone': {...}, 'depth_transformer': {...}} of fp32 arrays


class TrainState(NamedTuple):
  params: Params
  opt_state: Any


def compute_model_config(
  tc: TrainConfig, mesh: Mesh | None = None, tensor_parallel: int | None = None
) -> ModelConfig:
  """fp32 master params, compute in tc.compute_dtype (bf16 for real runs), and the vocab and
  depth MLP padded for `tensor_parallel` (default: the mesh's tensor axis, else tc.mesh's)."""
  if tensor_parallel is None:
    tensor_parallel = mesh.shape.get('tensor', 1) if mesh is not None else tc.mesh.tensor
  return tc.model.replace(
    param_dtype='float32', dtype=tc.compute_dtype, tensor_parallel=tensor_parallel
  )


def _no_decay(name: str) -> bool:
  return 'norm' in name or name.startswith('ln_') or 'bias' in name


def decay_mask(params: Params):
  """Weight decay on matrices and embeddings; none on norms and biases."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not _no_decay(str(path[-1].key)), params)


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
  """AdamW direction without the lr: the step multiplies by -lr from the stage's schedule, so
  the schedule lives outside the optimizer state and stages can change it."""
  return optax.chain(
    optax.clip_by_global_norm(oc.clip_norm),
    optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps),
    optax.add_decayed_weights(oc.weight_decay, mask=decay_mask),
  )


def graphdef_and_abstract(cfg: ModelConfig, lora: lora_lib.LoraConfig | None = None):
  """(graphdef, abstract nnx.State with axes metadata) without allocating memory."""
  return nnx.split(abstract(cfg, lora))


def param_shardings(abstract_state, mesh: Mesh) -> Params:
  return nnx.to_pure_dict(shd.state_shardings(abstract_state, mesh))


def opt_shardings(tx, abstract_params: Params, p_shardings: Params, mesh: Mesh):
  """Optimizer-state shardings: moments follow their params; scalars are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
    tx, lambda _, s: s, abstract_opt, p_shardings, transform_non_params=lambda _: replicated
  )


class StateSpec(NamedTuple):
  """Everything static about the state: how to rebuild the model and where each array lives."""

  graphdef: Any
  tx: optax.GradientTransformation
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings
  base: Any = None  # LoRA: the frozen base's ShapeDtypeStructs (with shardings); else None


def state_spec(tc: TrainConfig, mesh: Mesh, tensor_parallel: int | None = None) -> StateSpec:
  """`tensor_parallel`: the padding of the layout, when not the mesh's (see relayout)."""
  cfg = compute_model_config(tc, mesh, tensor_parallel)
  graphdef, abstract_state = graphdef_and_abstract(cfg, tc.lora)
  a_params = nnx.to_pure_dict(abstract_state)
  p_sh = param_shardings(abstract_state, mesh)
  with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  a_base = None
  if tc.lora is not None:
    (a_base, a_params), (b_sh, p_sh) = lora_lib.split_params(a_params), lora_lib.split_params(p_sh)
    weights = {
      m: {k: v for k, v in t.items() if not k.endswith(int8.SUFFIX)} for m, t in a_base.items()
    }
    a_base = jax.tree.map(
      with_sh, jax.eval_shape(lambda b: int8.cast_base(b, tc.lora.base_dtype), weights), b_sh
    )
  tx = make_optimizer(tc.optim)
  o_sh = opt_shardings(tx, a_params, p_sh, mesh)
  a_opt = jax.eval_shape(tx.init, a_params)
  abstract_ts = TrainState(
    jax.tree.map(with_sh, a_params, p_sh), jax.tree.map(with_sh, a_opt, o_sh)
  )
  return StateSpec(graphdef, tx, abstract_ts, TrainState(p_sh, o_sh), a_base)


def shardings_of(tree):
  return jax.tree.map(lambda a: a.sharding, tree)


def init_base(spec: StateSpec, tc: TrainConfig, params: Params | None = None) -> Params:
  """LoRA's frozen base in its base dtype and shardings: `params` (an official checkpoint's,
  without adapters) or the seed's initialisation."""
  mesh = jax.tree.leaves(spec.shardings)[0].mesh
  cfg = compute_model_config(tc, mesh)
  out = shardings_of(spec.base)
  build = lambda w: build_base(cfg, tc.seed, tc.lora.base_dtype, w)
  if params is None:
    return jax.jit(lambda: build(None), out_shardings=out)()
  return jax.jit(build, out_shardings=out)(params)


_INIT: dict = {}  # jitted initialisers by (model, dtype, optimizer, seed, shardings)


def init_state(spec: StateSpec, tc: TrainConfig, params: Params | None = None) -> TrainState:
  """Fresh state from the seed (or from given params, e.g. an official checkpoint), sharded."""
  mesh = jax.tree.leaves(spec.shardings)[0].mesh
  cfg = compute_model_config(tc, mesh)

  def build(params):
    if params is None:
      params = nnx.to_pure_dict(nnx.state(create(cfg, tc.seed, tc.lora)))
      if tc.lora is not None:  # the adapters only: XLA drops the base's initialisation
        params = lora_lib.split_params(params)[1]
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(params, spec.tx.init(params))

  if params is None:
    key = (cfg, tc.lora, tc.optim, tc.seed, mesh)
    if key not in _INIT:
      _INIT[key] = jax.jit(lambda: build(None), out_shardings=spec.shardings)
    return _INIT[key]()
  params = jax.device_put(params, spec.shardings.params)
  return jax.jit(build, in_shardings=(spec.shardings.params,), out_shardings=spec.shardings)(params)


def relayout(state: TrainState, spec: StateSpec) -> TrainState:
  """A state padded for another tensor size, in `spec`'s layout and shardings. The padding holds
  zeros in params and moments alike (its gradients are zero), so cutting or extending it with
  zeros changes no number of the model or the optimizer."""

  def fit(x, target):
    if x.shape == target.shape:
      return x
    x = x[tuple(slice(0, min(a, b)) for a, b in zip(x.shape, target.shape))]
    return jnp.pad(x, [(0, b - a) for a, b in zip(x.shape, target.shape)])

  return jax.jit(lambda s: jax.tree.map(fit, s, spec.abstract), out_shardings=spec.shardings)(state)


def params_from_model(model: FLMAudio) -> Params:
  return nnx.to_pure_dict(nnx.state(model))


def model_from_params(graphdef, params: Params) -> FLMAudio:
  return nnx.merge(graphdef, params)


def num_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))

"""Transforms of a model's weights, on its pure dict of params: LoRA's frozen base built and cast
(bfloat16, float32 or int8: flmjax.model.int8.cast_base), the base joined with the adapters,
and a LoRA model merged into a plain one. They sit above flm.py, lora.py and int8.py, which do
not import their callers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax.model import int8
from flmjax.model import lora as lora_lib
from flmjax.model.flm import abstract, create
from flmjax.model.weights import dequantize

Params = dict  # nested {'backbone': {...}, 'depth_transformer': {...}} of arrays


def join(base: Params | None, params: Params) -> Params:
  """The model's whole pure dict: the frozen base (LoRA) with the trained params beside it."""
  if base is None:
    return params
  return {m: {**base[m], **params[m]} for m in base}


def build_base(cfg, seed: int, base_dtype: str, weights: Params | None = None) -> Params:
  """LoRA's frozen base: `weights` (an official checkpoint's, without adapters) or the seed's
  initialisation, cast to `base_dtype`. Callers jit it (training and restore alike): eager ops
  may round the initialisation and the int8 scales differently in the last bit."""
  if weights is None:
    weights = nnx.to_pure_dict(nnx.state(create(cfg, seed)))
  return int8.cast_base(weights, base_dtype)


def merge(model: nnx.Module) -> nnx.Module:
  """A LoRA FLMAudio -> a plain FLMAudio (float32 params) with the adapters merged in."""
  params = nnx.to_pure_dict(nnx.state(model))
  cfg = model.cfg.replace(param_dtype='float32')
  graphdef, _ = nnx.split(abstract(cfg))
  return nnx.merge(graphdef, merged_params(params, model.lora))


def merged_params(params: Params, lora: lora_lib.LoraConfig) -> Params:
  """A LoRA model's pure dict (base + adapters, int8 or not) -> the plain model's, float32:
  int8 weights dequantized, W + A @ B * alpha / rank folded in (what `weights.dense` computes)."""
  base, adapters = lora_lib.split_params(params)
  out = {
    m: {k: dequantize(w, jnp.float32) for k, w in int8.wrap(t).items()} for m, t in base.items()
  }
  for module, name, roles in lora.sites():
    tree = adapters[module]
    out[module][name] = out[module][name] + lora_lib.delta(
      tree[f'{name}_lora_a'], tree[f'{name}_lora_b'], roles, lora.scale
    )
  return jax.tree.map(lambda x: x.astype(jnp.float32), out)

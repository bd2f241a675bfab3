"""The pure train step and eval step, jitted with explicit shardings and a donated state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from einops import rearrange
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd
from flmjax.model.loss import loss_sums, metrics_from_sums, objective
from flmjax.model.transforms import join
from flmjax.model.weights import fold
from flmjax.train.config import TrainConfig
from flmjax.train.state import StateSpec, TrainState, shardings_of


def remat_policy(name: str):
  return {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


# The step's shardings and activation pins, shared with the teacher-forced evaluation.
batch_shardings = shd.batch_shardings
activation_constraint = shd.activation_constraint
traced_on = shd.traced_on  # the mesh-in-context wrapper, shared with the decoder


def _grads_and_sums(graphdef, params, tokens, weights, policy, constrain, base=None, dropout=None):
  """Gradient of Σ w·ce (not yet divided by Σ w) and the loss sums of one micro-batch; with a
  LoRA `base`, the gradient of the adapters only (the base is a constant here)."""

  def f(p):
    s = loss_sums(
      nnx.merge(graphdef, join(base, p)), tokens, weights, policy, constrain, dropout=dropout
    )
    return objective(s)[0], s

  (_, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
  return grads, sums


def _dropout_rate(tc: TrainConfig) -> float:
  return float(tc.lora.dropout) if tc.lora is not None else 0.0


def train_step_fn(spec: StateSpec, tc: TrainConfig, mesh: Mesh):
  """The pure step: (state, batch, lr[, base]) -> (state, metrics); `base` is LoRA's frozen
  base (spec.base). Gradients accumulate over `tc.grad_accum` micro-batches as sums, so the
  update equals the one from the whole batch."""
  A, policy, constrain = tc.grad_accum, remat_policy(tc.remat), activation_constraint(mesh)
  rate = _dropout_rate(tc)
  batch_axes = shd.batch_sharding(mesh, 1).spec[0]

  def step(state: TrainState, batch: dict, lr: jax.Array, base=None):
    tokens, weights = batch['tokens'], batch['weights']  # [B,Z,T]
    # LoRA dropout: a stream per update, from the seed and the optimizer's update count, so a
    # resumed run draws what the uninterrupted one did.
    dropout = None
    if rate:
      dropout = (
        jax.random.fold_in(jax.random.key(tc.seed), optax.tree.get(state.opt_state, 'count')),
        rate,
      )
    if A == 1:
      grads, sums = _grads_and_sums(
        spec.graphdef, state.params, tokens, weights, policy, constrain, base, dropout
      )
    else:
      # Micro-batch a takes rows a, a+A, ...: each stays spread over the batch shards.
      split = lambda x: jax.lax.with_sharding_constraint(
        rearrange(x, '(b A) ... -> A b ...', A=A),
        NamedSharding(mesh, P(None, batch_axes, None, None)),
      )
      tok, wts = split(tokens), split(weights)  # [A,b,Z,T]

      def body(acc, xs):
        g, s = _grads_and_sums(
          spec.graphdef,
          state.params,
          xs[0],
          xs[1],
          policy,
          constrain,
          base,
          fold(dropout, xs[2]),
        )
        return jax.tree.map(jnp.add, acc, g), s

      # One trace of the forward/backward, in the scan body: the gradient sum starts at zeros
      # and each micro-batch's loss sums come out stacked [A].
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, stacked = jax.lax.scan(body, zeros, (tok, wts, jnp.arange(A)))
      sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)
    total_w = jnp.maximum(objective(sums)[1], 1e-9)
    grads = jax.tree.map(lambda g: g / total_w, grads)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state.params, updates)
    metrics = metrics_from_sums(sums)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['lr'] = lr
    return TrainState(params, opt_state), metrics

  return traced_on(mesh, step)


# Jitted steps keyed by what they depend on, so runs in one process (tests, resumes, main's
# evaluation) share compilations.
_COMPILED: dict = {}


def _key(tc: TrainConfig, mesh: Mesh, kind: str):
  seed = tc.seed if _dropout_rate(tc) else None  # dropout's stream
  return (kind, tc.model, tc.compute_dtype, tc.optim, tc.remat, tc.grad_accum, tc.lora, seed, mesh)


def jit_train_step(spec: StateSpec, tc: TrainConfig, mesh: Mesh):
  key = _key(tc, mesh, 'train')
  if key not in _COMPILED:
    _COMPILED[key] = _jit_train_step(spec, tc, mesh)
  return _COMPILED[key]


def _jit_train_step(spec: StateSpec, tc: TrainConfig, mesh: Mesh):
  """(state, batch, lr) -> (state, metrics); with LoRA (state, batch, lr, base): the base is
  read in place, neither donated nor returned."""
  replicated = NamedSharding(mesh, P())
  base = () if spec.base is None else (shardings_of(spec.base),)
  return jax.jit(
    train_step_fn(spec, tc, mesh),
    in_shardings=(spec.shardings, batch_shardings(mesh), replicated) + base,
    out_shardings=(spec.shardings, replicated),
    donate_argnums=(0,),
  )


def model_shardings(spec: StateSpec):
  """Shardings of the model's whole pure dict (transforms.join of the base and the params)."""
  return join(None if spec.base is None else shardings_of(spec.base), spec.shardings.params)


def jit_eval_step(spec: StateSpec, tc: TrainConfig, mesh: Mesh):
  """(params, batch) -> loss sums (add them over batches, then metrics_from_sums); with LoRA,
  params is the whole model, transforms.join(base, adapters)."""
  key = _key(tc, mesh, 'eval')
  if key in _COMPILED:
    return _COMPILED[key]
  replicated = NamedSharding(mesh, P())

  def evaluate(params, batch):
    return loss_sums(
      nnx.merge(spec.graphdef, params),
      batch['tokens'],
      batch['weights'],
      constrain=activation_constraint(mesh),
    )

  _COMPILED[key] = jax.jit(
    traced_on(mesh, evaluate),
    in_shardings=(model_shardings(spec), batch_shardings(mesh)),
    out_shardings=replicated,
  )
  return _COMPILED[key]

"""A weight, as the model computes with it: an array, or a small pytree node that a transform of
the params put in its place (flmjax.model.lora, flmjax.model.int8), in the manner of gemma's
peft wrappers and qwix:

  Int8Weight(q, scale)                  int8 values, a float32 scale per output channel
  LoraWeight(base, a, b, scale, site)   base (an array or an Int8Weight) + (x A) B * scale

The model's layers call `dense` and `rows` on whatever they are handed and never name an
adapter. Nodes are pytrees, so scans slice them by layer and `jax.tree.map` takes slices of
them (a codebook of the depth MLP) as it does of an array. This module knows no model.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """A symmetric per-output-channel int8 weight: q * scale (scale 1 over the input dims)."""

  q: jax.Array
  scale: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """base + A @ B * scale. A holds the weight's batched and input dims then r; B the batched
  dims, r, then the output dims. `site` numbers the weight's dropout stream."""

  base: Any  # jax.Array | Int8Weight
  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))
  site: int = dataclasses.field(default=0, metadata=dict(static=True))


Weight = Any  # jax.Array | Int8Weight | LoraWeight
Dropout = tuple  # (key, rate): dropout on the adapters' input, in training only


def fold(dropout: Dropout | None, data) -> Dropout | None:
  """A sub-stream of `dropout` for one module, layer, block or codebook (`data`, an int)."""
  return None if dropout is None else (jax.random.fold_in(dropout[0], data), dropout[1])


def dequantize(w: Weight, dtype) -> jax.Array:
  """The base as an array in `dtype` (an int8 weight dequantized); adapters are not folded."""
  if isinstance(w, LoraWeight):
    return dequantize(w.base, dtype)
  if isinstance(w, Int8Weight):
    return w.q.astype(dtype) * w.scale.astype(dtype)
  return w.astype(dtype)


def dense(spec: str, x: jax.Array, w: Weight, dropout: Dropout | None = None) -> jax.Array:
  """einsum(spec, x, W) for a weight W (one layer slice), plus einsum((x A), B) * scale for a
  LoraWeight. The low-rank einsums come from `spec`: letters shared by x, W and the output are
  batched, those of x and W only are contracted, those of W only are outputs. `dropout`
  (key, rate) drops the adapters' input as PEFT's lora_dropout does; the base path sees x."""
  y = _flat_einsum(spec, x, dequantize(w, x.dtype))
  if not isinstance(w, LoraWeight):
    return y
  if dropout is not None:
    key, rate = jax.random.fold_in(dropout[0], w.site), dropout[1]
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
  lhs, out = spec.split('->')
  xs, ws = lhs.split(',')
  ell = '...' if xs.startswith('...') else ''
  xs, out = xs.removeprefix('...'), out.removeprefix('...')
  batch = ''.join(c for c in ws if c in xs and c in out)
  ins = ''.join(c for c in ws if c in xs and c not in out)
  outs = ''.join(c for c in ws if c not in xs)
  mid = ''.join(c for c in xs if c not in ins) + 'r'
  xa = jnp.einsum(f'{ell}{xs},{batch}{ins}r->{ell}{mid}', x, w.a.astype(x.dtype))
  delta = jnp.einsum(f'{ell}{mid},{batch}r{outs}->{ell}{out}', xa, w.b.astype(x.dtype))
  return y + delta * jnp.asarray(w.scale, x.dtype)


def _flat_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """einsum(spec, x, w) with x's leading dims that w lacks (rows: B,T or R,C), when the output
  holds them together in the same order, merged into one for the matmul and split after.

  Why: the weight's gradient contracts those dims, and XLA:CPU, given more than one, transposes
  each activation it reads (a strided copy before every weight-gradient matmul, recomputing
  fused elementwise work in that order; issue 26, RESULTS.md). Merged, the matmul reads the
  activations as they lie. Row-major reshapes of adjacent dims are free; each output is the
  same sum of the same products.
  """
  lhs, out = spec.split('->')
  xs, ws = lhs.split(',')
  if xs.startswith('...'):  # name the ellipsis dims with letters the spec does not use
    free = [c for c in string.ascii_letters if c not in spec]
    ell = ''.join(free[: x.ndim - len(xs) + 3])
    xs, out = ell + xs[3:], out.replace('...', ell)
  rows = ''
  for c in xs:
    if c in ws:
      break
    rows += c
  at = out.find(rows)
  if len(rows) < 2 or at < 0:
    return jnp.einsum(f'{xs},{ws}->{out}', x, w)
  m = next(c for c in string.ascii_letters if c not in xs + ws + out)
  n = len(rows)
  y = jnp.einsum(f'{m}{xs[n:]},{ws}->{out.replace(rows, m)}', x.reshape(-1, *x.shape[n:]), w)
  return y.reshape(*y.shape[:at], *x.shape[:n], *y.shape[at + 1 :])


def rows(w: Weight, index: tuple, dtype, pin=None) -> jax.Array:
  """Embedding rows W[index] (+ A[index] @ B * scale for a LoraWeight) -> [..., d]: index is
  (ids,) or (codebooks, ids) for a table stacked over codebooks. `pin` (x -> x) places each
  table in `dtype` before the lookup (FSDP: the embed dim gathered, so lookups stay local)."""
  pin = pin or (lambda x: x)
  out = pin(dequantize(w, dtype))[index]
  if not isinstance(w, LoraWeight):
    return out
  a = pin(w.a.astype(dtype))[index]  # [..., r]
  b = w.b.astype(dtype)  # [r, d] or [C, r, d]
  spec = '...r,rd->...d' if b.ndim == 2 else '...Cr,Crd->...Cd'
  return out + jnp.einsum(spec, a, b) * jnp.asarray(w.scale, dtype)

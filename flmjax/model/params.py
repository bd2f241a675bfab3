"""Parameter creation with logical axis names (see flmjax/sharding.py for the rules table)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax.model import int8, lora


def param(
  rngs: nnx.Rngs | None,
  shape: tuple[int, ...],
  axes: tuple[str | None, ...],
  dtype,
  init: str = 'normal',
  std: float = 0.02,
  real_shape: tuple[int, ...] | None = None,
) -> nnx.Param:
  """A Param carrying `axes` (one logical name per dim) as metadata.

  real_shape: the unpadded extent; `init` fills it (the same draws as an unpadded param) and the
  padding beyond it is exact zeros.
  """
  if len(axes) != len(shape):
    raise ValueError(f'axes {axes} do not match shape {shape}')
  real = tuple(real_shape or shape)
  if init == 'ones':
    value = jnp.ones(real, dtype)
  elif init == 'zeros':
    value = jnp.zeros(real, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), real, jnp.float32)).astype(dtype)
  value = jnp.pad(value, [(0, s - r) for s, r in zip(shape, real)])
  return nnx.Param(value, axes=tuple(axes))


def values(module: nnx.Module, names: tuple[str, ...], dtype) -> dict:
  """The named weights of `module` as the layers compute with them (flmjax.model.weights): an
  array in the compute dtype, or, where a transform of the params left adapters or an int8
  scale beside it, a LoraWeight or Int8Weight (adapters and scales as stored, float32). An int8
  weight stays int8 here: `weights.dense` dequantizes the one layer slice it reads."""
  tree = {}
  for n in names:
    w = getattr(module, n)[...]
    tree[n] = w if jnp.issubdtype(w.dtype, jnp.integer) else w.astype(dtype)
    for s in (*lora.SUFFIXES, int8.SUFFIX):
      if hasattr(module, f'{n}{s}'):
        tree[f'{n}{s}'] = getattr(module, f'{n}{s}')[...]
  return lora.wrap(int8.wrap(tree), getattr(module, 'lora_scale', 0.0))

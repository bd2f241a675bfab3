"""Parameter creation with logical axis names (see flmjax/sharding.py for the rules table)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = 'normal', std: float = 0.02) -> nnx.Param:
  """A Param carrying `axes` (one logical name per dim) as metadata."""
  if len(axes) != len(shape):
    raise ValueError(f'axes {axes} do not match shape {shape}')
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


def values(module: nnx.Module, names: tuple[str, ...], dtype) -> dict[str, jax.Array]:
  """The named Params of `module` as plain arrays in the compute dtype."""
  return {n: getattr(module, n)[...].astype(dtype) for n in names}

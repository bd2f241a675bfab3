"""Pieces shared by the kernel wrappers."""

from __future__ import annotations

import jax


def write_rows(k_cache, v_cache, k_row, v_row, c, layer=None):
  """Writes this step's k/v rows [B,h*e] at position c (of layer `layer` when stacked)."""
  at = (0, c, 0, 0) if layer is None else (layer, 0, c, 0, 0)
  shape = (1,) * (layer is not None) + (k_row.shape[0], 1) + k_cache.shape[-2:]
  k_cache = jax.lax.dynamic_update_slice(k_cache, k_row.reshape(shape).astype(k_cache.dtype), at)
  v_cache = jax.lax.dynamic_update_slice(v_cache, v_row.reshape(shape).astype(v_cache.dtype), at)
  return k_cache, v_cache

"""Plain-JAX references for the kernels: the model's own code paths, not re-implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flmjax.model.depth import LAYER_PARAMS, layer_step, layers_step

# One depth layer at position c: (p, x [B,d], k_cache [B,C,h,e], v_cache, c, eps) -> (x, k, v).
depth_layer_step = layer_step
# All L layers (stacked params [L,...], caches [L,B,C,h,e]): what DepthTransformer.step runs.
depth_layers_step = layers_step

__all__ = ['LAYER_PARAMS', 'depth_layer_step', 'depth_layers_step', 'depth_frame']


def depth_frame(
  depth, cond: jax.Array, cache: dict, layer_fn=layer_step, layers_fn=None
) -> tuple[jax.Array, dict]:
  """A whole greedy depth frame: C steps of DepthTransformer.step, each feeding its argmax on.

  depth: flmjax.model.depth.DepthTransformer; cond [B,C,d]; cache from depth.init_cache.
  Returns (codes int32 [B,C], cache). This is what the decoder runs per frame (with sampling
  instead of argmax); the benchmark times it with the reference and the kernels as `layer_fn`
  (per layer) or `layers_fn` (the whole stack at once; see DepthTransformer.step).
  """
  cfg = depth.cfg
  b = cond.shape[0]

  def step(carry, c):
    prev, cache = carry
    logits, cache = depth.step(
      cond, prev, c, cache, layer_fn=layer_fn, layers_fn=layers_fn
    )  # [B,A]
    code = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (code, cache), code

  prev = jnp.full((b,), cfg.audio_emp_id, jnp.int32)
  (_, cache), codes = jax.lax.scan(step, (prev, cache), jnp.arange(cfg.num_codebooks))
  return codes.T, cache

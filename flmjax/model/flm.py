"""FLMAudio: backbone + text head + depth transformer, teacher-forced."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax.config import ModelConfig
from flmjax.model.backbone import Backbone
from flmjax.model.depth import DepthTransformer


class Output(NamedTuple):
  hidden: jax.Array  # [B,T,D] final-normed
  text_logits: jax.Array  # [B,T,V]
  depth_logits: jax.Array | None  # [B,T,C,A]


class FLMAudio(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Backbone(cfg, rngs=rngs)
    self.depth_transformer = DepthTransformer(cfg, rngs=rngs)

  def __call__(self, text: jax.Array, speak: jax.Array, listen: jax.Array,
               depth_prev: jax.Array | None = None, positions: jax.Array | None = None,
               remat_policy=None) -> Output:
    """text [B,T], speak/listen [B,T,C], depth_prev [B,T,C-1] or None."""
    b, t = text.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.backbone.embed(text, speak, listen)
    hidden, _ = self.backbone(x, positions, remat_policy=remat_policy)
    text_logits = self.backbone.text_logits(hidden)
    depth_logits = None
    if depth_prev is not None:
      depth_logits = self.depth_transformer(hidden, depth_prev, remat_policy=remat_policy)
    return Output(hidden, text_logits, depth_logits)


def create(cfg: ModelConfig, seed: int = 0) -> FLMAudio:
  return FLMAudio(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> FLMAudio:
  """The model with ShapeDtypeStructs for values: no memory is allocated."""
  return nnx.eval_shape(lambda: FLMAudio(cfg, rngs=nnx.Rngs(params=0)))

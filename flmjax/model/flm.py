"""FLMAudio: backbone + text head + depth transformer, teacher-forced."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax.config import ModelConfig
from flmjax.model.backbone import Backbone
from flmjax.model.depth import DepthTransformer
from flmjax.model.int8 import attach_scales
from flmjax.model.lora import LoraConfig, attach
from flmjax.model.weights import fold


class Output(NamedTuple):
  hidden: jax.Array  # [B,T,D] final-normed
  text_logits: jax.Array | None  # [B,T,V] over the real vocab; None when not asked for
  depth_logits: jax.Array | None  # [B,T,C,A]
  depth_features: jax.Array | None = None  # [B,T,C,d]: instead of depth_logits, when asked


def check_inputs(cfg: ModelConfig, text, speak, listen, depth_prev, positions=None) -> None:
  """Shapes always; id ranges and positions only of concrete arrays. An out-of-range id would
  index the embeddings silently (gathers clamp under XLA), and a position past
  max_position_embeddings runs RoPE where the model was never trained, so the public call checks
  both; under jit (the train step) the inputs are tracers and only shapes are checked, at no
  cost."""
  if text.ndim != 2:
    raise ValueError(f'FLMAudio: text must be [B, T] ids, got shape {text.shape}')
  b, t = text.shape
  limit = cfg.max_position_embeddings
  if positions is None and t > limit:
    raise ValueError(
      f'FLMAudio: {t} frames exceed max_position_embeddings {limit}; split the '
      f'sequence into windows of at most {limit} frames'
    )
  if positions is not None and not isinstance(positions, jax.core.Tracer) and positions.size:
    lo, hi = int(jnp.min(positions)), int(jnp.max(positions))
    if lo < 0 or hi >= limit:
      raise ValueError(
        f'FLMAudio: positions holds {lo if lo < 0 else hi}, outside '
        f'0..{limit - 1} (max_position_embeddings {limit})'
      )
  c = cfg.num_codebooks
  want = {'speak': (b, t, c), 'listen': (b, t, c), 'depth_prev': (b, t, c - 1)}
  ranges = {
    'text': cfg.vocab_size - 1,
    'speak': cfg.audio_pad_id,
    'listen': cfg.audio_pad_id,
    'depth_prev': cfg.audio_vocab_size - 1,
  }
  for name, x in (('text', text), ('speak', speak), ('listen', listen), ('depth_prev', depth_prev)):
    if x is None:
      continue
    if name in want and tuple(x.shape) != want[name]:
      raise ValueError(
        f'FLMAudio: {name} must have shape {want[name]} (B, T, ...), got {tuple(x.shape)}'
      )
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'FLMAudio: {name} has dtype {x.dtype}; token ids must be integers')
    if isinstance(x, jax.core.Tracer) or x.size == 0:
      continue
    lo, hi = int(jnp.min(x)), int(jnp.max(x))
    if lo < 0 or hi > ranges[name]:
      raise ValueError(
        f'FLMAudio: {name} holds id {lo if lo < 0 else hi}, outside '
        f'0..{ranges[name]}' + (' (PAD)' if name in ('speak', 'listen') else '')
      )


class FLMAudio(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
    """`lora` adds adapters (and int8 scales) beside the target weights (flmjax.model.lora),
    drawn after the base, so a seed gives the same base with and without them."""
    self.cfg = cfg
    self.lora = lora
    self.backbone = Backbone(cfg, rngs=rngs)
    self.depth_transformer = DepthTransformer(cfg, rngs=rngs)
    if lora is not None:
      attach(self, lora, rngs)
      if lora.base_dtype == 'int8':
        attach_scales(self)

  def __call__(
    self,
    text: jax.Array,
    speak: jax.Array,
    listen: jax.Array,
    depth_prev: jax.Array | None = None,
    positions: jax.Array | None = None,
    remat_policy=None,
    with_logits: bool = True,
    dropout=None,
  ) -> Output:
    """text [B,T], speak/listen [B,T,C], depth_prev [B,T,C-1] or None (integer ids).

    with_logits=False leaves the [B,T,V] and [B,T,C,A] logits to the caller (the blocked loss):
    text_logits and depth_logits are None, depth_features [B,T,C,d] is given instead.
    dropout: LoRA dropout (key, rate) in training, with with_logits=False only: sub-streams 0
    (backbone) and 1 (depth transformer) here, 2 and 3 for the heads in the loss.
    """
    if dropout is not None and with_logits:
      raise ValueError(
        'LoRA dropout is for training, where the loss applies the heads: pass with_logits=False'
      )
    text, speak, listen = jnp.asarray(text), jnp.asarray(speak), jnp.asarray(listen)
    depth_prev = None if depth_prev is None else jnp.asarray(depth_prev)
    positions = None if positions is None else jnp.asarray(positions)
    check_inputs(self.cfg, text, speak, listen, depth_prev, positions)
    b, t = text.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.backbone.embed(text, speak, listen)
    hidden, _ = self.backbone(x, positions, remat_policy=remat_policy, dropout=fold(dropout, 0))
    if not with_logits:
      features = (
        None
        if depth_prev is None
        else self.depth_transformer.features(
          hidden, depth_prev, remat_policy=remat_policy, dropout=fold(dropout, 1)
        )
      )
      return Output(hidden, None, None, features)
    text_logits = self.backbone.text_logits(hidden)
    depth_logits = None
    if depth_prev is not None:
      depth_logits = self.depth_transformer(hidden, depth_prev, remat_policy=remat_policy)
    return Output(hidden, text_logits, depth_logits)


def create(cfg: ModelConfig, seed: int = 0, lora: LoraConfig | None = None) -> FLMAudio:
  return FLMAudio(cfg, rngs=nnx.Rngs(params=seed), lora=lora)


def abstract(cfg: ModelConfig, lora: LoraConfig | None = None) -> FLMAudio:
  """The model with ShapeDtypeStructs for values: no memory is allocated."""
  return nnx.eval_shape(lambda: FLMAudio(cfg, rngs=nnx.Rngs(params=0), lora=lora))

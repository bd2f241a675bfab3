"""Teacher-forced loss on the delayed grid (ARCHITECTURE.md §4, /tmp/contract.md).

The backbone reads column j; its hidden state predicts column j+1's text and 8 speak codes.
Sums (not means) are returned so micro-batches and devices add up exactly; `metrics_from_sums`
turns them into per-stream losses and accuracies. The text loss runs over blocks of columns
(`text_cross_entropy`), so the [B,T,V] float32 logits never exist at once.
Shape letters as in flmjax/model/layers.py (Z: the 1 + 2C channels of the grid).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flmjax.config import ModelConfig
from flmjax.model.backbone import Backbone
from flmjax.model.flm import FLMAudio

STREAMS = ('text', 'semantic', 'acoustic')


def model_inputs(cfg: ModelConfig, tokens: jax.Array) -> dict[str, jax.Array]:
  """tokens [B,Z,T] -> the model's teacher-forced inputs over T-1 columns."""
  C = cfg.num_codebooks
  inp, nxt = tokens[:, :, :-1], tokens[:, :, 1:]
  return dict(text=inp[:, 0],  # [B,T-1]
              speak=jnp.swapaxes(inp[:, 1:1 + C], 1, 2),  # [B,T-1,C]
              listen=jnp.swapaxes(inp[:, 1 + C:], 1, 2),  # [B,T-1,C]
              depth_prev=jnp.swapaxes(nxt[:, 1:C], 1, 2))  # [B,T-1,C-1]: codes 0..C-2 of j+1


def _ce(logits: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Float32 cross-entropy and argmax of logits [..., V] against target [...]."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  return ce, jnp.argmax(logits, axis=-1)


def text_cross_entropy(backbone: Backbone, hidden: jax.Array, target: jax.Array, *,
                       block: int = 256, constrain=None) -> tuple[jax.Array, jax.Array]:
  """hidden [B,T,D], target [B,T] -> float32 cross-entropy and argmax [B,T] of the text head.

  Runs over blocks of `block` columns (lax.map), each rematerialised in the backward pass: the
  live logits are [B,block,Vp]. Per column it computes exactly what `_ce` does on the whole
  text_logits, so values and gradients equal the plain loss's.
  """
  def one(h, tgt):
    logits = backbone.text_logits(h, padded=True)  # [B,block,Vp]; padding at NEG_INF
    if constrain is not None:
      logits = constrain(logits, ('batch', 'time', 'vocab'))
    return _ce(logits, tgt)

  b, t, _ = hidden.shape
  if t <= block:
    return one(hidden, target)
  n = -(-t // block)
  split = lambda x: jnp.moveaxis(
      jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2)).reshape(
          b, n, block, *x.shape[2:]), 1, 0)  # [n,B,block,...]
  ce, pred = jax.lax.map(jax.checkpoint(lambda xs: one(*xs)), (split(hidden), split(target)))
  join = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * block)[:, :t]
  return join(ce), join(pred)


def loss_sums(model: FLMAudio, tokens: jax.Array, weights: jax.Array, remat_policy=None,
              constrain=None, text_block: int = 256) -> dict[str, jax.Array]:
  """tokens int32 [B,Z,T], weights float32 [B,Z,T] -> dict of float32 scalar sums.

  `constrain(x, logical_axes)` pins the sharding of the largest activations, the logits.
  `text_block`: columns per block of the text loss (see text_cross_entropy).
  """
  cfg = model.cfg
  C = cfg.num_codebooks
  out = model(**model_inputs(cfg, tokens), remat_policy=remat_policy, with_text_logits=False)
  if constrain is not None:
    out = out._replace(
        depth_logits=constrain(out.depth_logits, ('batch', 'time', 'codebook', 'audio_vocab')))
  tgt, w = tokens[:, :1 + C, 1:], weights[:, :1 + C, 1:].astype(jnp.float32)  # [B,1+C,T-1]

  text_ce, text_pred = text_cross_entropy(model.backbone, out.hidden, tgt[:, 0], block=text_block,
                                constrain=constrain)  # [B,T-1]
  speak_tgt = jnp.swapaxes(tgt[:, 1:], 1, 2)  # [B,T-1,C]
  audio_ce, audio_pred = _ce(out.depth_logits, speak_tgt)  # [B,T-1,C]
  audio_w = jnp.swapaxes(w[:, 1:], 1, 2)

  s = {}
  tw = w[:, 0]
  valid = tw > 0
  wait_t = tgt[:, 0] == cfg.text_wait_id
  wait_p = text_pred == cfg.text_wait_id
  s['text_wce'] = jnp.sum(tw * text_ce)
  s['text_w'] = jnp.sum(tw)
  words = valid & ~wait_t  # accuracy counts non-WAIT targets: WAIT alone is easy to get right
  s['text_n'] = jnp.sum(words, dtype=jnp.float32)
  s['text_correct'] = jnp.sum(words & (text_pred == tgt[:, 0]), dtype=jnp.float32)
  s['text_valid'] = jnp.sum(valid, dtype=jnp.float32)
  s['wait_target'] = jnp.sum(valid & wait_t, dtype=jnp.float32)
  s['wait_pred'] = jnp.sum(valid & wait_p, dtype=jnp.float32)
  for name, sl in (('semantic', slice(0, 1)), ('acoustic', slice(1, C))):
    aw, ok = audio_w[..., sl], audio_w[..., sl] > 0
    s[f'{name}_wce'] = jnp.sum(aw * audio_ce[..., sl])
    s[f'{name}_w'] = jnp.sum(aw)
    s[f'{name}_n'] = jnp.sum(ok, dtype=jnp.float32)
    s[f'{name}_correct'] = jnp.sum(ok & (audio_pred[..., sl] == speak_tgt[..., sl]),
                                   dtype=jnp.float32)
  return s


def objective(s: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(Σ w·ce, Σ w) over every target: the loss is their ratio, a weighted mean."""
  num = s['text_wce'] + s['semantic_wce'] + s['acoustic_wce']
  den = s['text_w'] + s['semantic_w'] + s['acoustic_w']
  return num, den


def metrics_from_sums(s: dict[str, jax.Array]) -> dict[str, jax.Array]:
  div = lambda a, b: a / jnp.maximum(b, 1e-9)
  num, den = objective(s)
  m = {'loss': div(num, den)}
  for name in STREAMS:
    m[f'loss_{name}'] = div(s[f'{name}_wce'], s[f'{name}_w'])
    m[f'acc_{name}'] = div(s[f'{name}_correct'], s[f'{name}_n'])
  m['wait_rate_pred'] = div(s['wait_pred'], s['text_valid'])
  m['wait_rate_target'] = div(s['wait_target'], s['text_valid'])
  return m

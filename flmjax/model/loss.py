"""Teacher-forced loss on the delayed grid (docs/architecture.md §4).

The backbone reads column j; its hidden state predicts column j+1's text and 8 speak codes.
Sums (not means) are returned so micro-batches and devices add up exactly; `metrics_from_sums`
turns them into per-stream losses and accuracies. The text loss runs over blocks of columns
(`text_cross_entropy`) and the audio loss over codebooks (`audio_cross_entropy`), so neither the
[B,T,V] nor the [B,T,C,A] float32 logits exist at once.
Shape letters as in flmjax/model/layers.py (Z: the 1 + 2C channels of the grid).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flmjax.config import ModelConfig
from flmjax.model.backbone import Backbone
from flmjax.model.depth import DepthTransformer
from flmjax.model.flm import FLMAudio
from flmjax.model.params import values
from flmjax.model.weights import dense, fold

STREAMS = ('text', 'semantic', 'acoustic')


def model_inputs(cfg: ModelConfig, tokens: jax.Array) -> dict[str, jax.Array]:
  """tokens [B,Z,T] -> the model's teacher-forced inputs over T-1 columns."""
  C = cfg.num_codebooks
  inp, nxt = tokens[:, :, :-1], tokens[:, :, 1:]
  return dict(
    text=inp[:, 0],  # [B,T-1]
    speak=jnp.swapaxes(inp[:, 1 : 1 + C], 1, 2),  # [B,T-1,C]
    listen=jnp.swapaxes(inp[:, 1 + C :], 1, 2),  # [B,T-1,C]
    depth_prev=jnp.swapaxes(nxt[:, 1:C], 1, 2),
  )  # [B,T-1,C-1]: codes 0..C-2 of j+1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ce(logits: jax.Array, target: jax.Array, also: int = -1):
  """logits [..., V], target int [...] -> (float32 cross-entropy, bool hit, bool also_hit) [...].

  hit: the target's logit is the largest (a tie counts for every tied id, where argmax would
  pick the first); also_hit: the same for the fixed id `also` (e.g. WAIT).
  Fused by hand: XLA's log_softmax + take_along_axis + argmax read and write [..., V] many times
  (a broadcast and a scatter for the gather's gradient, a variadic-reduce argmax). Here the
  forward makes two reductions over the logits and the backward one pass, softmax - onehot.
  """
  return _ce_fwd(logits, target, also)[0]


def _ce_fwd(logits, target, also):
  x = logits.astype(jnp.float32)  # [...,V]
  m = jnp.max(x, axis=-1, keepdims=True)  # [...,1]
  lse = m + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))  # [...,1]
  picked = jnp.take_along_axis(x, target[..., None], axis=-1)  # [...,1]
  hit, also_hit = picked >= m, x[..., also, None] >= m  # [...,1]
  return ((lse - picked)[..., 0], hit[..., 0], also_hit[..., 0]), (logits, target, lse)


def _ce_bwd(also, res, cts):
  logits, target, lse = res
  g = cts[0][..., None]  # [...,1]; the hits have no gradient
  x = logits.astype(jnp.float32)
  onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == target[..., None]
  return ((jnp.exp(x - lse) - onehot) * g).astype(logits.dtype), None  # [...,V]


_ce.defvjp(_ce_fwd, _ce_bwd)


def _blocks(f, xs: tuple, axis: int, size: int) -> tuple:
  """Maps f over blocks of `size` along `axis` of every array in xs (lax.map, each block
  rematerialised in the backward pass), padding the last block; outputs are joined back."""
  t = xs[0].shape[axis]
  if t <= size:
    return f(*xs)
  n = -(-t // size)

  def split(x):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * size - t)
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1 :]), axis, 0)

  outs = jax.lax.map(jax.checkpoint(lambda blk: f(*blk)), tuple(split(x) for x in xs))

  def join(y):  # [n, ..., size, ...] -> [..., t, ...]
    y = jnp.moveaxis(y, 0, axis)
    return jax.lax.slice_in_dim(
      y.reshape(*y.shape[:axis], n * size, *y.shape[axis + 2 :]), 0, t, axis=axis
    )

  return tuple(join(y) for y in outs)


def text_cross_entropy(
  backbone: Backbone,
  hidden: jax.Array,
  target: jax.Array,
  *,
  block: int = 256,
  constrain=None,
  also: int = -1,
  dropout=None,
):
  """hidden [B,T,D], target [B,T] -> (cross-entropy, hit, also_hit) [B,T] of the text head
  (see _ce).

  Runs over blocks of `block` columns, each rematerialised in the backward pass: the live
  logits are [B,block,Vp]. Values and gradients equal the plain loss's. `dropout`: LoRA
  dropout (key, rate) of an lm_head adapter, a stream per block (named by its first column).
  """

  def one(h, tgt, column):
    logits = backbone.text_logits(h, padded=True, dropout=fold(dropout, column[0, 0]))
    if constrain is not None:  # logits [B,block,Vp]; padding at NEG_INF
      logits = constrain(logits, ('batch', 'time', 'vocab'))
    return _ce(logits, tgt, also)

  columns = jnp.broadcast_to(jnp.arange(target.shape[1], dtype=jnp.int32), target.shape)
  return _blocks(one, (hidden, target, columns), 1, block)


def audio_cross_entropy(
  depth: DepthTransformer,
  features: jax.Array,
  target: jax.Array,
  weights: jax.Array,
  *,
  constrain=None,
  dropout=None,
):
  """features [B,T,C,d] (DepthTransformer.features), target int [B,T,C], weights float32
  [B,T,C] -> (Σ weights·ce per codebook float32 [C], hit bool [B,T,C]) (see _ce).

  One codebook at a time: the live logits are [B,T,A], laid out with A minor as the reductions
  want (a [B,T,C,A] array comes out of the batched head matmul codebook-major and costs
  transposes). Under differentiation the weighted sum's gradients come out of the forward pass
  beside the logits (a fused linear cross-entropy), so the backward pass neither recomputes the
  logits nor reads them again: it scales the saved [B,T,d] and [d,A] gradients by the sum's
  cotangent. `dropout`: LoRA dropout (key, rate) of a heads adapter, a stream per codebook.
  """
  heads = values(depth, ('heads',), features.dtype)['heads']  # [C,d,A], maybe a LoraWeight
  rate = None if dropout is None else dropout[1]

  def logits_of(x, w, key, c):  # [B,T,d], [d,A] (a codebook's slice) -> [B,T,A]
    logits = dense('BTd,dA->BTA', x, w, None if key is None else fold((key, rate), c))
    if constrain is not None:
      logits = constrain(logits, ('batch', 'time', 'audio_vocab'))
    return logits

  @jax.custom_vjp
  def one(x, w, tgt, wts, key, c):  # -> (Σ wts·ce, hit [B,T])
    (ce, hit, _), _ = _ce_fwd(logits_of(x, w, key, c), tgt, -1)
    return jnp.sum(wts * ce), hit

  def one_fwd(x, w, tgt, wts, key, c):
    logits, pull = jax.vjp(lambda x, w: logits_of(x, w, key, c), x, w)
    (ce, hit, _), res = _ce_fwd(logits, tgt, -1)
    dlogits, _ = _ce_bwd(-1, res, (wts, None, None))  # [B,T,A]
    return (jnp.sum(wts * ce), hit), pull(dlogits)  # residuals: dx [B,T,d], dw like w

  def one_bwd(grads, cts):
    scale = lambda g: g * cts[0].astype(g.dtype) if jnp.issubdtype(g.dtype, jnp.inexact) else g
    return (*jax.tree.map(scale, grads), None, None, None, None)

  one.defvjp(one_fwd, one_bwd)
  key = None if dropout is None else dropout[0]
  wce, hit = jax.lax.map(
    lambda blk: one(*blk[:4], key, blk[4]),
    (
      jnp.moveaxis(features, 2, 0),
      heads,
      jnp.moveaxis(target, 2, 0),
      jnp.moveaxis(weights, 2, 0),
      jnp.arange(target.shape[2]),
    ),
  )
  return wce, jnp.moveaxis(hit, 0, 2)  # [C], [B,T,C]


def loss_sums(
  model: FLMAudio,
  tokens: jax.Array,
  weights: jax.Array,
  remat_policy=None,
  constrain=None,
  text_block: int = 256,
  dropout=None,
) -> dict[str, jax.Array]:
  """tokens int32 [B,Z,T], weights float32 [B,Z,T] -> dict of float32 scalar sums.

  `constrain(x, logical_axes)` pins the sharding of the largest activations, the logits.
  `text_block`: columns per block of the text loss (see text_cross_entropy). `dropout`: LoRA
  dropout (key, rate) in training (see train.step); evaluation passes none.
  """
  cfg = model.cfg
  C = cfg.num_codebooks
  out = model(
    **model_inputs(cfg, tokens), remat_policy=remat_policy, with_logits=False, dropout=dropout
  )
  tgt, w = tokens[:, : 1 + C, 1:], weights[:, : 1 + C, 1:].astype(jnp.float32)  # [B,1+C,T-1]

  text_ce, text_hit, wait_p = text_cross_entropy(
    model.backbone,
    out.hidden,
    tgt[:, 0],
    block=text_block,
    constrain=constrain,
    also=cfg.text_wait_id,
    dropout=fold(dropout, 2),
  )  # [B,T-1]
  speak_tgt = jnp.swapaxes(tgt[:, 1:], 1, 2)  # [B,T-1,C]
  audio_w = jnp.swapaxes(w[:, 1:], 1, 2)
  audio_wce, audio_hit = audio_cross_entropy(
    model.depth_transformer,
    out.depth_features,
    speak_tgt,
    audio_w,
    constrain=constrain,
    dropout=fold(dropout, 3),
  )  # [C], [B,T-1,C]

  s = {}
  tw = w[:, 0]
  valid = tw > 0
  wait_t = tgt[:, 0] == cfg.text_wait_id
  s['text_wce'] = jnp.sum(tw * text_ce)
  s['text_w'] = jnp.sum(tw)
  words = valid & ~wait_t  # accuracy counts non-WAIT targets: WAIT alone is easy to get right
  s['text_n'] = jnp.sum(words, dtype=jnp.float32)
  s['text_correct'] = jnp.sum(words & text_hit, dtype=jnp.float32)
  s['text_valid'] = jnp.sum(valid, dtype=jnp.float32)
  s['wait_target'] = jnp.sum(valid & wait_t, dtype=jnp.float32)
  s['wait_pred'] = jnp.sum(valid & wait_p, dtype=jnp.float32)
  for name, sl in (('semantic', slice(0, 1)), ('acoustic', slice(1, C))):
    aw, ok = audio_w[..., sl], audio_w[..., sl] > 0
    s[f'{name}_wce'] = jnp.sum(audio_wce[sl])
    s[f'{name}_w'] = jnp.sum(aw)
    s[f'{name}_n'] = jnp.sum(ok, dtype=jnp.float32)
    s[f'{name}_correct'] = jnp.sum(ok & audio_hit[..., sl], dtype=jnp.float32)
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


def evaluate_batches(step, params, batches) -> dict[str, float]:
  """Adds `step(params, batch)`'s loss sums over `batches`, then turns them into metrics, with
  the target counts beside them (training's evaluate and flmjax.eval.teacher_forced)."""
  total = None
  for batch in batches:
    sums = jax.device_get(step(params, batch))
    total = sums if total is None else {k: total[k] + sums[k] for k in sums}
  out = {k: float(v) for k, v in metrics_from_sums(total).items()}
  out['targets_text'] = float(total['text_n'])
  out['targets_semantic'] = float(total['semantic_n'])
  return out

"""Token sampling as the official `sample_token` does it, batched with per-row parameters.

Order (official FLM/moshi): HF-style repetition penalty over a window of recent tokens, then
greedy argmax, or softmax(logits / temp) truncated by top-p (if top_p > 0), else top-k (if
top_k > 0), else the full distribution. Shape letters: B rows, V vocab, W window.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Sampling parameters of one session; the defaults are the official LMGen's."""

  temp_text: float = 0.01
  temp_audio: float = 0.5
  top_k_text: int = 1
  top_k_audio: int = 1
  top_p_text: float = 0.9
  top_p_audio: float = 0.9
  repetition_penalty_text: float = 1.03
  repetition_penalty_audio: float = 1.2
  penalty_window_text: int = 50  # <= 0: no penalty (the official LMGen accepts that too)
  penalty_window_audio: int = 50
  greedy: bool = False  # argmax after the repetition penalty (the official use_sampling=False)
  penalized_codebooks: int = 4  # the audio penalty covers codebooks 0..3 (official `i <= 3`)

  def __post_init__(self):
    def need(ok, field, why):
      if not ok:
        raise ValueError(f'SamplingConfig.{field}={getattr(self, field)!r}: {why}')

    for s in ('text', 'audio'):
      need(getattr(self, f'temp_{s}') >= 0, f'temp_{s}', 'temperature must be >= 0')
      need(getattr(self, f'top_k_{s}') >= 0, f'top_k_{s}', 'top_k must be >= 0 (0 = off)')
      need(
        0 <= getattr(self, f'top_p_{s}') <= 1, f'top_p_{s}', 'top_p must lie in [0, 1] (0 = off)'
      )
      need(
        getattr(self, f'repetition_penalty_{s}') >= 1.0,
        f'repetition_penalty_{s}',
        'the official sample_token requires a penalty >= 1.0',
      )
    need(self.penalized_codebooks >= 0, 'penalized_codebooks', 'must be >= 0')

  def penalty_buffer(self, kind: str) -> int:
    """Ring entries a decoder built on this config holds for the 'text' or 'audio' penalty
    window: the window, at least one (a window <= 0 penalizes nothing)."""
    return max(getattr(self, f'penalty_window_{kind}'), 1)

  def stream(self, kind: str) -> StreamParams:
    """Scalar parameters of the 'text' or 'audio' stream."""
    return StreamParams(
      temp=getattr(self, f'temp_{kind}'),
      top_k=getattr(self, f'top_k_{kind}'),
      top_p=getattr(self, f'top_p_{kind}'),
      penalty=getattr(self, f'repetition_penalty_{kind}'),
      penalty_window=getattr(self, f'penalty_window_{kind}'),
      greedy=self.greedy,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StreamParams:
  """One stream's sampling parameters; each field a scalar or a per-row [B] array."""

  temp: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  penalty: jax.Array
  penalty_window: jax.Array  # how many recent tokens the repetition penalty looks at
  greedy: jax.Array

  def per_row(self, batch: int) -> StreamParams:
    """Every field as a [B] array of its canonical dtype."""
    dtypes = dict(
      temp=jnp.float32,
      top_k=jnp.int32,
      top_p=jnp.float32,
      penalty=jnp.float32,
      penalty_window=jnp.int32,
      greedy=jnp.bool_,
    )
    return StreamParams(
      **{f: jnp.broadcast_to(jnp.asarray(getattr(self, f), d), (batch,)) for f, d in dtypes.items()}
    )


def repetition_penalty(
  logits: jax.Array, window: jax.Array, valid: jax.Array, penalty: jax.Array, base=0
) -> jax.Array:
  """HF-style penalty: logits [B,V]; window [B,W] recent ids where `valid` [B,W]; penalty [B].

  A token seen in the window gets logit * penalty when negative, logit / penalty otherwise; once,
  however often it was seen (HF's gather/scatter). base: the vocabulary id of logits' column 0
  (a vocab shard's offset; ids outside the shard are left to their own shard).
  """
  b, v = logits.shape
  local = window - base
  ids = jnp.where(valid & (local >= 0) & (local < v), local, v)  # v: dropped by the scatter
  seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], ids].set(True, mode='drop')
  pen = penalty[:, None].astype(logits.dtype)
  penalized = jnp.where(logits < 0, logits * pen, logits / pen)
  return jnp.where(seen, penalized, logits)


_CANDIDATES = 64  # top-k pre-selection that usually settles the truncation without a sort
_ONE_BITS = 0x3F800000  # float32 1.0 as int32: probabilities' bit patterns lie in [0, this]


class _Vocab:
  """Reductions over a vocab dim that may be split over mesh axis `axis` (inside shard_map):
  each shard holds `size` consecutive ids from `base`. axis None: the whole vocab, no
  collectives. Only [B]-sized values and the 64 candidates per row ever cross shards."""

  def __init__(self, axis, size: int):
    self.axis, self.size = axis, size
    self.base = 0 if axis is None else jax.lax.axis_index(axis) * size

  def sum(self, x):
    return x if self.axis is None else jax.lax.psum(x, self.axis)

  def max(self, x):
    return x if self.axis is None else jax.lax.pmax(x, self.axis)

  def min(self, x):
    return x if self.axis is None else jax.lax.pmin(x, self.axis)

  def gather(self, x):
    """[B,n] per shard -> [B, shards*n] in shard (= vocabulary) order."""
    return x if self.axis is None else jax.lax.all_gather(x, self.axis, axis=1, tiled=True)

  def argmax(self, x):
    """[B]: the first id of the largest value (jnp.argmax over the whole vocab)."""
    top = self.max(jnp.max(x, axis=-1))
    first = jnp.argmax(x, axis=-1).astype(jnp.int32) + self.base
    return self.min(jnp.where(jnp.max(x, axis=-1) == top, first, jnp.iinfo(jnp.int32).max))

  def candidates(self, x, k: int):
    """The k largest values of every row of x [B,V] and their ids, ties to the lower id (what
    lax.top_k gives on the whole vocab): the shards' own top-k, merged."""
    vals, ids = jax.lax.top_k(x, min(k, x.shape[-1]))
    vals, ids = self.gather(vals), self.gather(ids.astype(jnp.int32) + self.base)
    if self.axis is None:
      return vals, ids
    vals, at = jax.lax.top_k(vals, min(k, vals.shape[-1]))
    return vals, jnp.take_along_axis(ids, at, axis=-1)


def _bisect_threshold(
  probs: jax.Array, top_k: jax.Array, top_p: jax.Array, vocab: _Vocab
) -> jax.Array:
  """[B]: the smallest kept probability, found by binary search on float32 bit patterns.

  Kept under top-p: p_i with mass(p > p_i) <= top_p; under top-k: p_i with count(p > p_i) < k.
  Both tests are monotone in the threshold, so the smallest passing value is the last kept
  probability, exactly (31 masked reductions instead of a sort).
  """

  def passes(bits):  # bits [B] int32 >= 0
    x = jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]
    above = probs > x
    mass_ok = vocab.sum(jnp.sum(jnp.where(above, probs, 0.0), axis=-1)) <= top_p
    count_ok = vocab.sum(jnp.sum(above, axis=-1)) < top_k
    return jnp.where(top_p > 0, mass_ok, count_ok)

  def body(_, bounds):
    lo, hi = bounds  # passes(hi); not passes(lo) (lo = -1 stands for "below every value")
    mid = (lo + hi) // 2
    live = hi - lo > 1
    ok = passes(jnp.maximum(mid, 0))
    return jnp.where(live & ~ok, mid, lo), jnp.where(live & ok, mid, hi)

  b = probs.shape[0]
  start = (jnp.full((b,), -1, jnp.int32), jnp.full((b,), _ONE_BITS, jnp.int32))
  _, hi = jax.lax.fori_loop(0, 31, body, start)
  return jax.lax.bitcast_convert_type(hi, jnp.float32)


def _threshold(probs, vals, top_k, top_p, vocab: _Vocab, vocab_size: int) -> jax.Array:
  """truncation_threshold with the candidates vals [B,k] (falling) already found."""
  k = vals.shape[-1]
  before = jnp.cumsum(vals, axis=-1) - vals
  last_p = jnp.sum(before <= top_p[:, None], axis=-1) - 1  # rank of the last kept token
  thr_p = jnp.take_along_axis(vals, last_p[:, None], axis=-1)[:, 0]
  thr_k = jnp.take_along_axis(vals, jnp.clip(top_k - 1, 0, k - 1)[:, None], axis=-1)[:, 0]
  use_p, use_k = top_p > 0, (top_p <= 0) & (top_k > 0)
  settled = jnp.where(
    use_p, (jnp.sum(vals, axis=-1) > top_p) | (k == vocab_size), jnp.where(use_k, top_k <= k, True)
  )
  fast = jnp.where(use_p, thr_p, jnp.where(use_k, thr_k, 0.0))
  # Tensor peers hold the same rows, so they agree on the predicate (collectives inside agree).
  return jax.lax.cond(
    jnp.all(settled),
    lambda: fast,
    lambda: jnp.where(settled, fast, _bisect_threshold(probs, top_k, top_p, vocab)),
  )


def truncation_threshold(probs: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """probs [B,V] -> [B]: tokens with p >= threshold survive top-p (if top_p > 0), else top-k (if
  top_k > 0), else all (threshold 0).

  The official rule sorts and drops a token once the mass ranked above it exceeds top_p. The
  top-64 candidates settle that whenever their mass exceeds top_p (top-k: whenever k <= 64);
  otherwise a binary search does, so no row ever needs a full-vocabulary sort.
  """
  vocab = _Vocab(None, probs.shape[-1])
  vals, _ = vocab.candidates(probs, _CANDIDATES)
  return _threshold(probs, vals, top_k, top_p, vocab, probs.shape[-1])


def sample(
  keys: jax.Array,
  logits: jax.Array,
  params: StreamParams,
  window: jax.Array,
  valid: jax.Array,
  *,
  axis=None,
) -> jax.Array:
  """The official sample_token for B rows: keys [B] typed PRNG keys, logits [B,V] -> [B] int32.

  `params` holds [B] arrays; `window` [B,W] with `valid` [B,W] is the repetition-penalty window
  (nothing valid = no penalty, as on the official first step). axis: inside shard_map, the mesh
  axis that splits the vocab (logits is then this shard's [B,V/n]); the token is the same as on
  the whole vocab (see sample_sharded). Logits at NEG_INF (vocab padding) are never drawn.
  """
  vocab = _Vocab(axis, logits.shape[-1])
  vocab_size = logits.shape[-1] * (1 if axis is None else jax.lax.axis_size(axis))
  logits = repetition_penalty(logits.astype(jnp.float32), window, valid, params.penalty, vocab.base)
  best = vocab.argmax(logits)
  argmax_rows = params.greedy | (params.temp <= 0)

  def draw():
    temp = jnp.where(argmax_rows, 1.0, params.temp)[:, None]
    # softmax(logits / temp), its max and normalizer reduced over the whole vocab.
    scaled = logits / temp
    weights = jnp.exp(scaled - vocab.max(jnp.max(scaled, axis=-1))[:, None])  # [B,V]
    probs = weights / vocab.sum(jnp.sum(weights, axis=-1))[:, None]
    vals, ids = vocab.candidates(probs, _CANDIDATES)  # [B,k] falling
    thr = _threshold(probs, vals, params.top_k, params.top_p, vocab, vocab_size)
    keep = probs >= thr[:, None]
    u = jax.vmap(jax.random.uniform)(keys)  # [B] in [0, 1)
    # Inverse CDF in vocabulary order, so rounding that reorders two near-equal probabilities
    # (another sharding, another batch) cannot change the draw. When every kept token is a
    # candidate (top-k, and top-p over a peaked distribution) it runs on the candidates alone.
    in_candidates = vocab.sum(jnp.sum(keep, axis=-1)) == jnp.sum(vals >= thr[:, None], axis=-1)
    return jax.lax.cond(
      jnp.all(in_candidates),
      lambda: _draw_candidates(vals, ids, thr, u),
      lambda: _draw_vocab(probs, keep, u, vocab, vocab_size),
    )

  # Truncation costs most of the sampling time; skip it when every row is greedy.
  drawn = jax.lax.cond(jnp.all(argmax_rows), lambda: best, draw)
  return jnp.where(argmax_rows, best, drawn)


def _draw_candidates(vals, ids, thr, u) -> jax.Array:
  """The inverse-CDF draw over the candidates (vals, ids [B,k]) with p >= thr [B]."""
  order = jnp.argsort(ids, axis=-1)  # vocabulary order
  vals, ids = (jnp.take_along_axis(x, order, axis=-1) for x in (vals, ids))
  cdf = jnp.cumsum(jnp.where(vals >= thr[:, None], vals, 0.0), axis=-1)  # [B,k]
  at = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
  return jnp.take_along_axis(ids, jnp.minimum(at, ids.shape[-1] - 1)[:, None], axis=-1)[:, 0]


def _draw_vocab(probs, keep, u, vocab: _Vocab, vocab_size: int) -> jax.Array:
  """The inverse-CDF draw over every kept token: each shard's CDF, offset by the mass of the
  shards before it."""
  kept = jnp.where(keep, probs, 0.0)
  cdf = jnp.cumsum(kept, axis=-1)  # [B,V] this shard's
  totals = vocab.gather(cdf[:, -1:])  # [B,shards]
  shard = vocab.base // vocab.size
  before = jnp.sum(jnp.where(jnp.arange(totals.shape[-1]) < shard, totals, 0.0), axis=-1)
  at = vocab.sum(jnp.sum(cdf + before[:, None] <= (u * jnp.sum(totals, axis=-1))[:, None], axis=-1))
  # u * total rounding up to the total would count every token: take the last kept one then.
  ids = jnp.arange(probs.shape[-1]) + vocab.base
  last = vocab.max(jnp.max(jnp.where(kept > 0, ids, -1), axis=-1))
  return jnp.minimum(at, last).astype(jnp.int32)


def sample_sharded(
  keys: jax.Array, logits: jax.Array, params: StreamParams, window: jax.Array, valid: jax.Array
) -> jax.Array:
  """`sample` on logits [B,V] whose vocab the mesh in context splits (the rules' activation_vocab,
  tensor): each shard reduces its own slice; only [B]-sized values and 64 candidates a row cross
  shards, never the logits. Without a mesh (or with an unsplit vocab) it is `sample`.

  Greedy and top-k draws equal the unsharded ones exactly (the same candidates, the same
  float32 sums over them); top-p and the full distribution divide by the normalizer, a sum whose
  rounding follows the split, so there a draw could differ only where a kept mass or the uniform
  lies within float32 rounding of a boundary.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return sample(keys, logits, params, window, valid)
  rows, split = shd.logical_to_spec(('activation_batch', 'activation_vocab'), logits.shape, mesh)
  if split is None:
    return sample(keys, logits, params, window, valid)
  per_row = P(rows)
  wide = P(rows, None)
  fn = functools.partial(sample, axis=split)
  return jax.shard_map(
    fn,
    mesh=mesh,
    check_vma=False,
    in_specs=(per_row, P(rows, split), jax.tree.map(lambda _: per_row, params), wide, wide),
    out_specs=per_row,
  )(keys, logits, params, window, valid)

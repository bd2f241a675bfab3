"""Token sampling as the official `sample_token` does it, batched with per-row parameters.

Order (official FLM/moshi): HF-style repetition penalty over a window of recent tokens, then
greedy argmax, or softmax(logits / temp) truncated by top-p (if top_p > 0), else top-k (if
top_k > 0), else the full distribution. Shape letters: B rows, V vocab, W window.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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
  window_text: int = 50
  window_audio: int = 50
  greedy: bool = False  # argmax after the repetition penalty (the official use_sampling=False)
  penalized_codebooks: int = 4  # the audio penalty covers codebooks 0..3 (official `i <= 3`)

  def __post_init__(self):
    def need(ok, field, why):
      if not ok:
        raise ValueError(f'SamplingConfig.{field}={getattr(self, field)!r}: {why}')
    for s in ('text', 'audio'):
      need(getattr(self, f'temp_{s}') >= 0, f'temp_{s}', 'temperature must be >= 0')
      need(getattr(self, f'top_k_{s}') >= 0, f'top_k_{s}', 'top_k must be >= 0 (0 = off)')
      need(0 <= getattr(self, f'top_p_{s}') <= 1, f'top_p_{s}',
           'top_p must lie in [0, 1] (0 = off)')
      need(getattr(self, f'repetition_penalty_{s}') >= 1.0, f'repetition_penalty_{s}',
           'the official sample_token requires a penalty >= 1.0')
      need(getattr(self, f'window_{s}') >= 1, f'window_{s}', 'the penalty window must be >= 1')
    need(self.penalized_codebooks >= 0, 'penalized_codebooks', 'must be >= 0')

  def stream(self, kind: str) -> 'StreamParams':
    """Scalar parameters of the 'text' or 'audio' stream."""
    return StreamParams(temp=getattr(self, f'temp_{kind}'), top_k=getattr(self, f'top_k_{kind}'),
                        top_p=getattr(self, f'top_p_{kind}'),
                        penalty=getattr(self, f'repetition_penalty_{kind}'),
                        window=getattr(self, f'window_{kind}'), greedy=self.greedy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StreamParams:
  """One stream's sampling parameters; each field a scalar or a per-row [B] array."""
  temp: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  penalty: jax.Array
  window: jax.Array
  greedy: jax.Array

  def per_row(self, batch: int) -> 'StreamParams':
    """Every field as a [B] array of its canonical dtype."""
    dtypes = dict(temp=jnp.float32, top_k=jnp.int32, top_p=jnp.float32, penalty=jnp.float32,
                  window=jnp.int32, greedy=jnp.bool_)
    return StreamParams(**{f: jnp.broadcast_to(jnp.asarray(getattr(self, f), d), (batch,))
                           for f, d in dtypes.items()})


def repetition_penalty(logits: jax.Array, window: jax.Array, valid: jax.Array,
                       penalty: jax.Array) -> jax.Array:
  """HF-style penalty: logits [B,V]; window [B,W] recent ids where `valid` [B,W]; penalty [B].

  A token seen in the window gets logit * penalty when negative, logit / penalty otherwise; once,
  however often it was seen (HF's gather/scatter).
  """
  b, v = logits.shape
  ids = jnp.where(valid, window, v)  # out-of-range ids are dropped by the scatter
  seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], ids].set(True, mode='drop')
  pen = penalty[:, None].astype(logits.dtype)
  penalized = jnp.where(logits < 0, logits * pen, logits / pen)
  return jnp.where(seen, penalized, logits)


_CANDIDATES = 64  # top-k pre-selection that usually settles the truncation without a sort
_ONE_BITS = 0x3F800000  # float32 1.0 as int32: probabilities' bit patterns lie in [0, this]


def _bisect_threshold(probs: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """[B]: the smallest kept probability, found by binary search on float32 bit patterns.

  Kept under top-p: p_i with mass(p > p_i) <= top_p; under top-k: p_i with count(p > p_i) < k.
  Both tests are monotone in the threshold, so the smallest passing value is the last kept
  probability, exactly (31 masked reductions instead of a sort).
  """
  def passes(bits):  # bits [B] int32 >= 0
    x = jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]
    above = probs > x
    mass_ok = jnp.sum(jnp.where(above, probs, 0.0), axis=-1) <= top_p
    count_ok = jnp.sum(above, axis=-1) < top_k
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


def truncation_threshold(probs: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """probs [B,V] -> [B]: tokens with p >= threshold survive top-p (if top_p > 0), else top-k (if
  top_k > 0), else all (threshold 0).

  The official rule sorts and drops a token once the mass ranked above it exceeds top_p. The
  top-64 candidates settle that whenever their mass exceeds top_p (top-k: whenever k <= 64);
  otherwise a binary search does, so no row ever needs a full-vocabulary sort.
  """
  k = min(_CANDIDATES, probs.shape[-1])
  vals, _ = jax.lax.top_k(probs, k)  # [B,k] falling
  before = jnp.cumsum(vals, axis=-1) - vals
  last_p = jnp.sum(before <= top_p[:, None], axis=-1) - 1  # rank of the last kept token
  thr_p = jnp.take_along_axis(vals, last_p[:, None], axis=-1)[:, 0]
  thr_k = jnp.take_along_axis(vals, jnp.clip(top_k - 1, 0, k - 1)[:, None], axis=-1)[:, 0]
  use_p, use_k = top_p > 0, (top_p <= 0) & (top_k > 0)
  settled = jnp.where(use_p, (jnp.sum(vals, axis=-1) > top_p) | (k == probs.shape[-1]),
                      jnp.where(use_k, top_k <= k, True))
  fast = jnp.where(use_p, thr_p, jnp.where(use_k, thr_k, 0.0))
  return jax.lax.cond(jnp.all(settled), lambda: fast,
                      lambda: jnp.where(settled, fast, _bisect_threshold(probs, top_k, top_p)))


def sample(keys: jax.Array, logits: jax.Array, params: StreamParams, window: jax.Array,
           valid: jax.Array) -> jax.Array:
  """The official sample_token for B rows: keys [B] typed PRNG keys, logits [B,V] -> [B] int32.

  `params` holds [B] arrays; `window` [B,W] with `valid` [B,W] is the repetition-penalty window
  (nothing valid = no penalty, as on the official first step).
  """
  logits = repetition_penalty(logits.astype(jnp.float32), window, valid, params.penalty)
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  argmax_rows = params.greedy | (params.temp <= 0)

  def draw():
    temp = jnp.where(argmax_rows, 1.0, params.temp)[:, None]
    probs = jax.nn.softmax(logits / temp, axis=-1)
    keep = probs >= truncation_threshold(probs, params.top_k, params.top_p)[:, None]
    # Inverse CDF in vocabulary order: one uniform per row, and rounding that reorders two
    # near-equal probabilities (another sharding, another batch) cannot change the draw.
    cdf = jnp.cumsum(jnp.where(keep, probs, 0.0), axis=-1)  # [B,V]
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    drawn = jnp.sum(cdf <= u[:, None], axis=-1).astype(jnp.int32)
    drawn = jnp.minimum(drawn, probs.shape[-1] - 1)
    return jnp.where(argmax_rows, best, drawn)

  # Truncation costs most of the sampling time; skip it when every row is greedy.
  return jax.lax.cond(jnp.all(argmax_rows), lambda: best, draw)


def add_sampling_flags(ap) -> None:
  """--temp-text, --top-k-audio, ...: one argparse flag per SamplingConfig field, same defaults."""
  for field in ('temp', 'top_k', 'top_p', 'repetition_penalty'):
    for kind in ('text', 'audio'):
      name = f'{field}_{kind}'
      default = getattr(SamplingConfig, name)
      ap.add_argument('--' + name.replace('_', '-'), type=type(default), default=default)

"""The official sample_token on known distributions: penalty, greedy, temperature, top-k, top-p.

Frequencies come from N draws (one row per draw, one compile). With N = 20000 the standard error
of a frequency is at most 0.0035; the tolerance 0.02 is over 5 standard errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmjax.decode.sampling import StreamParams, repetition_penalty, sample

N = 20000
TOL = 0.02
PROBS = np.array([0.05, 0.4, 0.25, 0.15, 0.1, 0.05], np.float32)
LOG_PROBS = np.log(PROBS)


@pytest.fixture(scope='module')
def draw():
  fn = jax.jit(sample)

  def run(temp=1.0, top_k=0, top_p=0.0, greedy=False, logits=LOG_PROBS, seed=0):
    keys = jax.random.split(jax.random.key(seed), N)
    params = StreamParams(temp, top_k, top_p, 1.0, 1, greedy).per_row(N)
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, len(logits)))
    window = jnp.zeros((N, 1), jnp.int32)
    tokens = np.asarray(fn(keys, rows, params, window, jnp.zeros((N, 1), bool)))
    return np.bincount(tokens, minlength=len(logits)) / N

  return run


def test_full_distribution(draw):
  np.testing.assert_allclose(draw(), PROBS, atol=TOL)


def test_temperature(draw):
  want = PROBS ** (1 / 2.5)
  np.testing.assert_allclose(draw(temp=2.5), want / want.sum(), atol=TOL)


def test_top_k(draw):
  freq = draw(top_k=2)
  np.testing.assert_allclose(freq, [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0, 0], atol=TOL)
  assert freq[[0, 3, 4, 5]].sum() == 0  # truncated tokens never appear


def test_top_p_takes_precedence_over_top_k(draw):
  # Sorted: 0.4, 0.25, 0.15, 0.1, ... Mass ranked above each: 0, 0.4, 0.65, 0.8 -> top_p 0.7
  # keeps the first three (the official rule drops a token once cumsum - p > top_p).
  freq = draw(top_p=0.7, top_k=1)
  np.testing.assert_allclose(freq, [0, 0.4 / 0.8, 0.25 / 0.8, 0.15 / 0.8, 0, 0], atol=TOL)
  assert freq[[0, 4, 5]].sum() == 0


def test_greedy_and_zero_temperature_take_the_argmax(draw):
  assert draw(greedy=True)[1] == 1.0
  assert draw(temp=0.0)[1] == 1.0


def test_per_row_parameters():
  """Each row samples with its own parameters in the same call."""
  keys = jax.random.split(jax.random.key(1), 4)
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS)), (4, len(PROBS)))
  params = StreamParams(
    temp=jnp.array([1.0, 1.0, 0.0, 1.0]),
    top_k=jnp.array([1, 0, 0, 0]),
    top_p=jnp.array([0.0, 0.3, 0.0, 0.0]),
    penalty=jnp.ones(4),
    penalty_window=jnp.ones(4, jnp.int32),
    greedy=jnp.array([False, False, False, True]),
  )
  tokens = sample(keys, logits, params, jnp.zeros((4, 1), jnp.int32), jnp.zeros((4, 1), bool))
  assert np.asarray(tokens).tolist() == [1, 1, 1, 1]  # top-1, top-p 0.3, temp 0, greedy


def test_repetition_penalty_values():
  logits = jnp.array([[2.0, -1.0, 0.5, -3.0, 1.0]])
  window = jnp.array([[0, 1, 1, 3, 4]])
  valid = jnp.array([[True, True, True, True, False]])  # id 4 is outside the window
  got = np.asarray(repetition_penalty(logits, window, valid, jnp.array([2.0])))
  # Seen ids once each (id 1 twice): positive / 2, negative * 2.
  np.testing.assert_allclose(got, [[1.0, -2.0, 0.5, -6.0, 1.0]], rtol=0, atol=0)


def test_penalty_comes_before_greedy():
  logits = jnp.array([[1.0, 0.9, -0.5]])
  params = StreamParams(1.0, 0, 0.0, 1.2, 1, True).per_row(1)
  keys = jax.random.split(jax.random.key(0), 1)
  seen = sample(keys, logits, params, jnp.array([[0]]), jnp.array([[True]]))
  unseen = sample(keys, logits, params, jnp.array([[0]]), jnp.array([[False]]))
  assert int(seen[0]) == 1 and int(unseen[0]) == 0  # 1.0 / 1.2 < 0.9


def official_keep(probs, top_k, top_p):
  """The official rule, written with a sort (numpy): which ids survive truncation."""
  order = np.argsort(-probs, kind='stable')
  sorted_p = probs[order]
  if top_p > 0:
    keep_sorted = np.cumsum(sorted_p) - sorted_p <= top_p
  elif top_k > 0:
    keep_sorted = np.arange(len(probs)) < top_k
  else:
    keep_sorted = np.ones(len(probs), bool)
  keep = np.zeros(len(probs), bool)
  keep[order] = keep_sorted
  return keep


@pytest.mark.parametrize('top_k,top_p', [(0, 0.5), (0, 0.97), (100, 0.0), (3, 0.0), (0, 0.0)])
def test_truncation_matches_the_sorting_rule(top_k, top_p):
  """Flat distributions over 300 ids put the boundary past the 64 candidates (the binary-search
  path); peaked ones settle among them (the fast path). Both must equal the sorting rule."""
  from flmjax.decode.sampling import truncation_threshold

  rng = np.random.default_rng(0)
  logits = np.concatenate([rng.normal(0, 0.3, (4, 300)), rng.normal(0, 4.0, (4, 300))])
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  rows = len(probs)
  thr = truncation_threshold(
    jnp.asarray(probs), jnp.full((rows,), top_k, jnp.int32), jnp.full((rows,), top_p, jnp.float32)
  )
  got = probs >= np.asarray(thr)[:, None]
  for b in range(rows):
    np.testing.assert_array_equal(got[b], official_keep(probs[b], top_k, top_p), err_msg=f'row {b}')
  if top_p == 0.5:
    assert got[:4].sum(axis=1).min() > 64, 'the flat rows must exercise the binary search'


def test_penalty_window_holds_the_last_tokens_of_each_session():
  """Token of step t sits at slot t mod W; a session's window may be shorter than the buffer."""
  from flmjax.decode.frame import window_valid

  got = np.asarray(window_valid(jnp.array([0, 2, 7, 7]), jnp.array([3, 3, 3, 5]), 5))
  want = np.zeros((4, 5), bool)
  want[1, [0, 1]] = True  # steps 0, 1
  want[2, [4, 0, 1]] = True  # steps 4, 5, 6
  want[3, :] = True  # steps 2..6
  np.testing.assert_array_equal(got, want)

"""The delayed grid: delays, initial column, weights, un-delay (also against the official LMGen)."""

import numpy as np
import pytest

from flmjax.config import ModelConfig
from flmjax.data.grid import LossWeights, build_grid, pad_grid, undelay

CFG = ModelConfig.tiny()
WAIT, PAD, EMP = CFG.text_wait_id, CFG.audio_pad_id, CFG.audio_emp_id


def streams(num_frames=10, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.integers(0, 300, num_frames)
  text[::3] = WAIT
  speak = rng.integers(0, 2048, (8, num_frames))
  listen = rng.integers(0, 2048, (8, num_frames))
  return text, speak, listen


def test_grid_offsets_follow_the_contract():
  # text/speak: delay + 1; listen: delay. Semantic delay 0, acoustic 1.
  assert CFG.grid_offsets == (1, 1) + (2,) * 7 + (0,) + (1,) * 7


def test_delays_place_every_frame():
  text, speak, listen = streams()
  tokens, _ = build_grid(CFG, text, speak, listen)
  assert tokens.shape == (17, 12) and tokens.dtype == np.int32
  frames = np.concatenate([text[None], speak, listen])
  for c, off in enumerate(CFG.grid_offsets):
    np.testing.assert_array_equal(tokens[c, off : off + 10], frames[c])
    # before the channel's first frame: WAIT (text) / PAD (audio)
    assert (tokens[c, :off] == (WAIT if c == 0 else PAD)).all()
    assert (tokens[c, off + 10 :] == (WAIT if c == 0 else PAD)).all()


def test_initial_column():
  text, speak, listen = streams()
  tokens, weights = build_grid(CFG, text, speak, listen)
  want = np.array([WAIT] + [PAD] * 8 + [listen[0, 0]] + [PAD] * 7)
  np.testing.assert_array_equal(tokens[:, 0], want)
  assert (weights[:, 0] == 0).all()


def test_weights():
  text, speak, listen = streams()
  speak[3, 4] = PAD  # frame 4 of codebook 3 (channel 4) -> column 6
  speak[0, 2] = EMP  # frame 2 of the semantic codebook -> column 3
  lw = LossWeights(text=1.5, wait=0.25, semantic=2.0, acoustic=0.3)
  tokens, weights = build_grid(CFG, text, speak, listen, lw, num_columns=16)
  assert weights.dtype == np.float32 and weights.shape == (17, 16)
  # text: columns 1..10 hold frames 0..9; WAIT targets get the wait weight
  want_text = np.zeros(16)
  want_text[1:11] = np.where(text == WAIT, 0.25, 1.5)
  np.testing.assert_array_equal(weights[0], want_text)
  want_sem = np.zeros(16)
  want_sem[1:11] = 2.0
  want_sem[3] = 0.0  # EMP is never a target
  np.testing.assert_array_equal(weights[1], want_sem)
  for c in range(2, 9):
    want = np.zeros(16, np.float32)  # 0.3 as float32, exactly
    want[2:12] = 0.3
    if c == 4:
      want[6] = 0.0  # PAD target
    np.testing.assert_array_equal(weights[c], want)
  assert (weights[9:] == 0).all()  # listen is never a target
  assert tokens[4, 6] == PAD and tokens[1, 3] == EMP


def test_missing_streams_are_wait_pad_and_never_targets():
  text, speak, _ = streams()
  tokens, weights = build_grid(CFG, None, speak, None)
  assert (tokens[0] == WAIT).all() and (weights[0] == 0).all()
  assert (tokens[9:] == PAD).all() and (weights[9:] == 0).all()
  assert (weights[1, 1:11] == 1.0).all()
  tokens, weights = build_grid(CFG, text, None, None)
  assert (tokens[1:] == PAD).all() and (weights[1:] == 0).all()


def test_undelay_inverts_build_grid():
  text, speak, listen = streams(num_frames=7, seed=3)
  tokens, _ = build_grid(CFG, text, speak, listen)
  np.testing.assert_array_equal(undelay(CFG, tokens), np.concatenate([text[None], speak, listen]))


def test_undelay_matches_official_lmgen(golden_dir):
  """LMGen's columns, laid on our grid and un-delayed, give LMGen's own un-delayed outputs."""
  z = np.load(golden_dir / 'flm_tiny' / 'stream.npz')
  columns, out = z['columns_plain'], z['out_plain']  # [24, 17] written at column step+1; [24, 9]
  tokens = np.full((17, 25), PAD, np.int32)
  tokens[0] = WAIT
  tokens[:9, 1:] = columns[:, :9].T
  frames = undelay(CFG, tokens)  # [17, 23]
  # Frame f is what LMGen returned at step f + 1 (step 0 returns nothing).
  np.testing.assert_array_equal(frames[:9].T, out[1:])


def test_pad_grid_window():
  text, speak, listen = streams()
  tokens, weights = build_grid(CFG, text, speak, listen)
  t, w = pad_grid(CFG, tokens, weights, 4, 16)
  np.testing.assert_array_equal(t[:, :8], tokens[:, 4:])
  assert (t[0, 8:] == WAIT).all() and (t[1:, 8:] == PAD).all() and (w[:, 8:] == 0).all()
  assert (w[:, 0] == 0).all()
  np.testing.assert_array_equal(w[:, 1:8], weights[:, 5:])


def test_bad_inputs():
  text, speak, listen = streams()
  with pytest.raises(ValueError, match='at least one of'):
    build_grid(CFG, None, None, None)
  with pytest.raises(ValueError, match='disagree on the number of frames'):
    build_grid(CFG, text[:5], speak, listen)
  with pytest.raises(ValueError, match=r'speak must be \[8, F\]'):
    build_grid(CFG, text, speak[:4], listen)
  bad = speak.copy()
  bad[2, 1] = 2050
  with pytest.raises(ValueError, match='speak holds id 2050, outside 0..2049'):
    build_grid(CFG, text, bad, listen)
  with pytest.raises(ValueError, match='text_ids holds id 320, outside 0..319'):
    build_grid(CFG, np.full(10, 320), speak, listen)
  with pytest.raises(ValueError, match=r'tokens must be \[17, T\]'):
    undelay(CFG, np.zeros((9, 4)))

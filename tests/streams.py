"""Helpers of the streaming-decoder tests (tests/test_decode_*.py): random user streams, and a
decoder stepped through one."""

import numpy as np


def users(batch, frames, seed=0):
  """[frames, B, 8] random user codes, PAD now and then."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2048, (frames, batch, 8))
  return np.where(rng.random(codes.shape) < 0.1, 2048, codes).astype(np.int32)


def run(dec, state, user):
  """Steps through user [T,B,8] -> (state, out [T,B,9] with -1 where invalid)."""
  outs = []
  for frame in user:
    state, out, valid = dec.step(state, frame)
    outs.append(np.where(np.asarray(valid)[:, None], np.asarray(out), -1))
  return state, np.stack(outs)

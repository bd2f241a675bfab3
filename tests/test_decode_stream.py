"""Streaming decoding on the golden tiny model: official parity, batching, slot reuse, sharding.

Compiles: one decoder with frame functions for B=1 and B=4, one sharded B=4 decoder.
"""

import dataclasses

import numpy as np
import pytest
import streams
from streams import run

import flmjax
from flmjax import sharding as shd
from flmjax.data.grid import build_grid, undelay
from flmjax.decode import SamplingConfig, StreamingDecoder

GREEDY = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
# Golden `out_penalty`: argmax after the text penalty 1.1 and the audio penalty 1.2 (window 50).
GREEDY_PENALTY = SamplingConfig(
  greedy=True, repetition_penalty_text=1.1, repetition_penalty_audio=1.2
)
# Sampling that visibly samples (the official text temp 0.01 is almost argmax).
SAMPLED = SamplingConfig(temp_text=1.0, temp_audio=1.0, top_p_text=0.95, top_p_audio=0.9)
FRAMES = 16


@pytest.fixture(scope='module')
def stream(tiny_dir):
  return np.load(tiny_dir / 'stream.npz')


@pytest.fixture(scope='module')
def decoder(tiny_model):
  return StreamingDecoder(tiny_model, SAMPLED, max_len=32)


def users(batch, frames=FRAMES, seed=0):
  return streams.users(batch, frames, seed)  # this file's streams are FRAMES long


# Windows <= 0 mean no penalty (as the official LMGen): the penalty run then equals the plain one.
NO_WINDOW = dataclasses.replace(GREEDY_PENALTY, penalty_window_text=0, penalty_window_audio=-1)


@pytest.mark.parametrize(
  'name,sampling',
  [('plain', GREEDY), ('penalty', GREEDY_PENALTY), ('plain', NO_WINDOW)],
  ids=['plain', 'penalty', 'penalty-window-0'],
)
def test_golden_stream_parity(decoder, stream, name, sampling):
  # Per-session sampling: the greedy settings come in through reset_slots.
  state = decoder.reset_slots(decoder.init(1), np.array([True]), sampling=sampling)
  user = np.transpose(stream['user'], (2, 0, 1))  # [24, 1, 8]
  _, out = run(decoder, state, user)
  np.testing.assert_array_equal(out[:, 0], stream[f'out_{name}'])


def test_outputs_and_columns_agree_with_the_data_grid(decoder, stream, tiny_model):
  """The columns the backbone reads are build_grid's columns of (model frames, user frames)."""
  cfg = tiny_model.cfg
  state = decoder.reset_slots(decoder.init(1), np.array([True]), sampling=GREEDY)
  user = np.transpose(stream['user'], (2, 0, 1))
  outs, columns = [], []
  for frame in user:
    state, out, valid = decoder.step(state, frame)
    columns.append(np.asarray(decoder.input_column(state))[0])
    if bool(valid[0]):
      outs.append(np.asarray(out)[0])
  columns = np.stack(columns, axis=1)  # [17, T]: column j read at step j
  model = np.stack(outs, axis=1)  # [9, T-1]: frames 0..T-2
  T = columns.shape[1]
  # Model frame T-1 lands past column T-1: any filler works.
  filler = np.array([cfg.text_wait_id] + [cfg.audio_pad_id] * 8)[:, None]
  padded = np.concatenate([model, filler], axis=1)  # [9, T]
  tokens, _ = build_grid(cfg, padded[0], padded[1:], stream['user'][0][:, :T], num_columns=T)
  # One known difference, kept for official parity: at step 0 LMGen writes the acoustic codes it
  # sampled (an acoustic "frame -1" that is never returned) into column 1, where the training
  # grid has PAD. The golden stream shows it (columns_plain[0]).
  frame_minus_1 = (slice(2, 9), 1)
  np.testing.assert_array_equal(columns[frame_minus_1], stream['columns_plain'][0, 2:9])
  assert (tokens[frame_minus_1] == cfg.audio_pad_id).all()
  tokens[frame_minus_1] = columns[frame_minus_1]
  np.testing.assert_array_equal(columns, tokens)
  np.testing.assert_array_equal(undelay(cfg, columns)[:9], model[:, : T - max(cfg.grid_offsets)])


@pytest.mark.slow
def test_batched_sessions_equal_single_sessions(decoder):
  user = users(4)
  state = decoder.init(4, seed=10)
  # Session 2 runs with its own parameters: greedy with penalties.
  state = decoder.reset_slots(
    state, np.array([0, 0, 1, 0], bool), seeds=12, sampling=GREEDY_PENALTY
  )
  _, batched = run(decoder, state, user)
  for b in range(4):
    single = decoder.init(1, seed=10 + b)
    if b == 2:
      single = decoder.reset_slots(single, np.array([True]), seeds=12, sampling=GREEDY_PENALTY)
    _, alone = run(decoder, single, user[:, b : b + 1])
    np.testing.assert_array_equal(batched[:, b], alone[:, 0], err_msg=f'session {b}')
  # Different seeds really sample differently (otherwise the test above proves little).
  assert (batched[1:, 0] != batched[1:, 1]).any()


@pytest.mark.slow
def test_penalty_windows_past_the_decoders_own_are_exact(tiny_model):
  """A decoder whose penalty rings hold a whole session (penalty_buffer, as the server's) runs a
  session with window 100 beside one with the default 50: each equals a decoder built for its
  window alone, through the first 50 frames (every window fits 50: the short read) and after."""
  wide = dataclasses.replace(GREEDY_PENALTY, penalty_window_text=100, penalty_window_audio=100)
  user = users(2, frames=120, seed=3)
  session = StreamingDecoder(tiny_model, GREEDY_PENALTY, max_len=128, penalty_buffer=128)
  assert session.max_window('text') is None  # any window: the ring holds every frame
  state = session.reset_slots(session.init(2), np.array([True, False]), seeds=0, sampling=wide)
  _, got = run(session, state, user)
  want = {}
  for name, sampling in (('wide', wide), ('default', GREEDY_PENALTY)):
    own = StreamingDecoder(tiny_model, sampling, max_len=128)  # rings of its window exactly
    _, want[name] = run(own, own.init(2), user)
  np.testing.assert_array_equal(got[:, 0], want['wide'][:, 0])
  np.testing.assert_array_equal(got[:, 1], want['default'][:, 1])
  # The wider window changes the session (else the check above proves little).
  assert (want['wide'][:, 0] != want['default'][:, 0]).any()


def test_slot_reset_midway_does_not_leak(decoder):
  user = users(4, frames=2 * FRAMES, seed=1)
  state = decoder.init(4, seed=20)
  state, first = run(decoder, state, user[:FRAMES])
  # Slot 1 ends; slot 3 is released and stays free; slot 1 starts a new session (seed 99).
  state = decoder.release_slots(state, np.array([0, 1, 0, 1], bool))
  state = decoder.reset_slots(state, np.array([0, 1, 0, 0], bool), seeds=99)
  state, second = run(decoder, state, user[FRAMES:])
  assert np.asarray(state['offset']).tolist() == [2 * FRAMES, FRAMES, 2 * FRAMES, FRAMES]
  assert (second[:, 3] == -1).all(), 'a free slot returns nothing'
  _, fresh = run(decoder, decoder.init(1, seed=99), user[FRAMES:, 1:2])
  np.testing.assert_array_equal(second[:, 1], fresh[:, 0])
  # The untouched sessions continue as if nothing happened.
  _, whole = run(decoder, decoder.init(4, seed=20), user)
  np.testing.assert_array_equal(np.concatenate([first, second])[:, [0, 2]], whole[:, [0, 2]])


@pytest.mark.slow
def test_sharded_decode_equals_unsharded(decoder, tiny_dir):
  mesh = shd.make_mesh(data=4, tensor=2)
  model = flmjax.load_official(str(tiny_dir), dtype='float32', mesh=mesh)
  sharded = StreamingDecoder(model, SAMPLED, max_len=32, mesh=mesh)
  user = users(4, seed=2)
  state = sharded.init(4, seed=30)
  cache = state['cache']['k'].sharding.spec
  assert cache[1] in ('data', ('data', 'fsdp')) and cache[2] == 'tensor', cache  # sessions, heads
  assert model.backbone.q[...].sharding.spec[2] == 'tensor'
  _, got = run(sharded, state, user)
  _, want = run(decoder, decoder.init(4, seed=30), user)
  np.testing.assert_array_equal(got, want)


def test_bad_user_codes_are_rejected(decoder, tiny_model):
  state = decoder.init(1)
  with pytest.raises(ValueError, match=r'expected shape \(1, 8\).*got \(8,\)'):
    decoder.step(state, np.zeros(8, np.int32))
  with pytest.raises(ValueError, match=r'code 2049 at \[slot 0, codebook 3\] is out of range'):
    decoder.step(state, np.array([[0, 0, 0, 2049, 0, 0, 0, 0]]))
  with pytest.raises(ValueError, match=r'code -1 at \[slot 0, codebook 0\]'):
    decoder.step(state, np.full((1, 8), -1))
  with pytest.raises(ValueError, match='expected integer codes, got dtype float32'):
    decoder.step(state, np.zeros((1, 8), np.float32))
  with pytest.raises(ValueError, match=r'slot mask: expected a bool array of shape \(1,\)'):
    decoder.reset_slots(state, np.array([1, 0]))
  # Its 50-entry rings hold all of a 32-frame session, so any window fits; not one of 64.
  decoder.reset_slots(state, np.array([True]), sampling=SamplingConfig(penalty_window_text=60))
  longer = StreamingDecoder(tiny_model, SAMPLED, max_len=64)
  with pytest.raises(ValueError, match='penalty_window_text=60 exceeds the penalty buffer of 50'):
    longer.reset_slots(state, np.array([True]), sampling=SamplingConfig(penalty_window_text=60))


def test_bad_decoder_settings_are_rejected(tiny_model):
  with pytest.raises(ValueError, match="overflow='wrap'"):
    StreamingDecoder(tiny_model, overflow='wrap')
  with pytest.raises(ValueError, match='temperature must be >= 0'):
    SamplingConfig(temp_text=-1.0)
  with pytest.raises(ValueError, match='top_p must lie in'):
    SamplingConfig(top_p_audio=1.5)
  with pytest.raises(ValueError, match='penalty >= 1.0'):
    SamplingConfig(repetition_penalty_text=0.9)

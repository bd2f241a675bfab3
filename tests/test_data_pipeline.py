"""grain pipeline: prepare -> grain -> batch equals building directly; resume; shards; mixture."""

import collections
import json

import numpy as np
import pytest

from flmjax.config import ModelConfig
from flmjax.data import manifest as mf
from flmjax.data import records as rec_lib
from flmjax.data import synthetic
from flmjax.data.grid import LossWeights, build_grid, pad_grid
from flmjax.data.monologue import layout_monologue
from flmjax.data.pipeline import (
  SourceSpec,
  _WindowedGrid,
  make_loader,
  record_grid,
  windows_per_record,
)
from flmjax.data.prepare import prepare
from flmjax.data.tokenizer import load_tokenizer

CFG = ModelConfig.tiny()
LW = LossWeights()
BIG = 256  # longer than any synthetic sample's grid (slow users, long pauses): windows start at 0


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  paths = synthetic.generate(
    str(root / 'syn'), seed=1, num_tts_asr=24, num_duplex=24, num_heldout=4
  )
  tok = load_tokenizer(paths['tokenizer'])
  for name in ('tts_asr', 'duplex'):
    paths[f'{name}_prepared'] = str(root / name)
    prepare(paths[name], paths[f'{name}_prepared'], tok, strict=True, progress=False)
  paths['tok'] = tok
  return paths


def direct_grids(paths, name, mode, offset=0, speech_stream='speak', window=BIG):
  """Grids built straight from the manifest and .npy files, without prepare or grain."""
  out = []
  for entry in mf.read_manifest(paths[name]):
    codes = {s: np.load(p) for s, p in entry.codes.items()}
    frames = next(iter(codes.values())).shape[1]
    speaker = 'model'
    sentences = [
      (s.start_frame, s.end_frame, paths['tok'].encode(s.text))
      for s in entry.segments
      if s.speaker == speaker
    ]
    # text past the audio extends the sample (up to one window) with PAD audio
    text, _, _ = layout_monologue(
      sentences, frames, mode, offset, CFG.text_wait_id, max_frames=frames + window
    )
    codes = {
      s: np.pad(c, ((0, 0), (0, len(text) - frames)), constant_values=CFG.audio_pad_id)
      for s, c in codes.items()
    }
    if entry.kind == 'duplex':
      speak, listen = codes['model'], codes['user']
    else:
      speak, listen = (codes['model'], None) if speech_stream == 'speak' else (None, codes['model'])
    tokens, weights = build_grid(CFG, text, speak, listen, LW)
    out.append(pad_grid(CFG, tokens, weights, 0, window))
  return out


def rows(batches):
  for b in batches:
    assert b['tokens'].shape[1:] == (17, b['tokens'].shape[2]) and b['tokens'].dtype == np.int32
    assert b['weights'].dtype == np.float32
    # every id fits the tiny model's embedding tables
    assert b['tokens'][:, 0].max() < CFG.vocab_size and b['tokens'][:, 1:].max() < 2050
    assert b['tokens'].min() >= 0
    yield from zip(b['tokens'], b['weights'])


def key(tokens, weights):
  return tokens.tobytes() + weights.tobytes()


def loader(paths, specs, **kw):
  args = dict(window=BIG, batch_size=8, seed=0, loss_weights=LW, shard_index=0, shard_count=1)
  args.update(kw)
  return make_loader(CFG, specs, **args)


def test_round_trip_duplex_equals_direct(corpus):
  it = loader(corpus, [SourceSpec(corpus['duplex_prepared'], layout='trail', offset_frames=2)])
  got = collections.Counter(key(*r) for r in rows(next(it) for _ in range(3)))  # one epoch
  # duplex ignores `layout`: the model's monologue always leads its speech
  want = collections.Counter(key(*g) for g in direct_grids(corpus, 'duplex', 'lead', 2))
  assert got == want and sum(got.values()) == 24


@pytest.mark.parametrize('mode, stream', [('lead', 'speak'), ('trail', 'listen')])
def test_round_trip_tts_asr_equals_direct(corpus, mode, stream):
  spec = SourceSpec(corpus['tts_asr_prepared'], layout=mode, offset_frames=1, speech_stream=stream)
  got = collections.Counter(key(*r) for r in rows([next(loader(corpus, [spec]))]))
  want = {key(*g) for g in direct_grids(corpus, 'tts_asr', mode, 1, stream)}
  assert set(got) <= want and sum(got.values()) == 8


def test_reshuffles_every_epoch(corpus):
  it = loader(corpus, [SourceSpec(corpus['duplex_prepared'])])
  epochs = [[key(*r) for r in rows(next(it) for _ in range(3))] for _ in range(2)]
  # each epoch holds every sample once, in a new order
  assert collections.Counter(epochs[0]) == collections.Counter(epochs[1])
  assert epochs[0] != epochs[1]


def test_mixed_layout_draws_both(corpus):
  spec = SourceSpec(corpus['tts_asr_prepared'], layout='mixed', offset_frames=1)
  it = loader(corpus, [spec])
  lead = {key(*g) for g in direct_grids(corpus, 'tts_asr', 'lead', 1)}
  trail = {key(*g) for g in direct_grids(corpus, 'tts_asr', 'trail', 1)}
  got = [key(*r) for r in rows(next(it) for _ in range(6))]
  assert all(k in lead or k in trail for k in got)
  n_lead = sum(k in lead for k in got)
  assert 8 <= n_lead <= 40, n_lead  # 48 fair coin flips


def find_window(full, tokens, weights, window):
  """(sample, start) of the full grid a window was cut from; its weights may only be zeroed at the
  edges (a window hanging over an end of the grid trains only its own targets)."""
  for i, (t, w) in enumerate(full):
    for s in range(BIG - window + 1):
      if (t[:, s : s + window] == tokens).all():
        kept = weights.any(0).nonzero()[0]  # target columns the window trains
        assert (weights[:, 0] == 0).all() and len(kept)
        assert (kept == np.arange(kept[0], kept[-1] + 1)).all(), 'masked columns not at the edges'
        np.testing.assert_array_equal(weights[:, kept], w[:, s + kept])
        return i, s
  raise AssertionError('a window is not a slice of any sample grid')


def test_random_windows_are_slices_of_the_grid(corpus):
  it = loader(corpus, [SourceSpec(corpus['duplex_prepared'])], window=16)
  full = direct_grids(corpus, 'duplex', 'lead', window=BIG)
  starts = {find_window(full, t, w, 16)[1] for t, w in rows(next(it) for _ in range(3))}
  assert len(starts) > 3  # windows start at random columns


def test_long_records_yield_a_window_per_window_length(corpus):
  """One epoch holds ceil((T + W - 3) / (W - 1)) windows of a T-column record, every record."""
  w = 16
  full = direct_grids(corpus, 'duplex', 'lead', window=BIG)
  columns = np.array([(g[1].any(0).nonzero()[0].max() + 1) for g in full])  # T per sample
  want = windows_per_record(columns, w)
  assert want.min() >= 3  # every sample is longer than 2 windows
  it = loader(corpus, [SourceSpec(corpus['duplex_prepared'])], window=w, batch_size=1)
  got = collections.Counter(
    find_window(full, t, wt, w)[0] for t, wt in rows(next(it) for _ in range(int(want.sum())))
  )
  assert got == collections.Counter(dict(enumerate(want)))


def test_every_target_is_trained_about_once_per_epoch():
  """Over many epochs, each target column of a long record is trained n(W-1)/(T+W-3) times per
  epoch on average (1 <= that < 1.5): uniform over the record, the two ends included."""
  rng = np.random.default_rng(0)
  frames, w = 45, 16
  codes = rng.integers(0, 2048, (8, frames)).astype(np.int16)
  record = rec_lib.Record('r', 'tts_asr', {'model': codes}, [('model', 3, 40, [5, 6, 7])])
  make = _WindowedGrid(CFG, SourceSpec('x'), w, LW)
  size = frames + max(CFG.grid_offsets)  # T, no extension in lead mode
  n = int(windows_per_record(np.array([size]), w)[0])
  grid = record_grid(CFG, record, SourceSpec('x'), 'lead', LW).tokens  # [17, T]
  assert grid.shape[1] == size
  epochs = 1000
  trained = np.zeros(size)
  data = rec_lib.encode_record(record)
  for k in range(epochs * n):
    out = make(data, np.random.default_rng(k))
    (start,) = [s for s in range(size - w + 1) if (grid[:, s : s + w] == out['tokens']).all()]
    trained[start + out['weights'].any(0).nonzero()[0]] += 1
  expected = n * (w - 1) / (size + w - 3)
  assert 1 <= expected < 1.5
  # binomial noise: sd = sqrt(epochs * n * p * (1 - p)) / epochs < 0.03; allow 5 sd. The old
  # sampler (starts uniform inside the grid) trained the first target 0.13 times per epoch.
  np.testing.assert_allclose(trained[1:] / epochs, expected, atol=0.15)
  assert trained[0] == 0


def test_deterministic_and_resume(corpus):
  specs = [
    SourceSpec(corpus['duplex_prepared']),
    SourceSpec(corpus['tts_asr_prepared'], layout='mixed'),
  ]
  a = loader(corpus, specs, window=32, seed=5)
  first = [next(a) for _ in range(5)]  # crosses an epoch of each source
  state = a.get_state()
  after = [next(a) for _ in range(4)]
  b = loader(corpus, specs, window=32, seed=5)
  for x, y in zip(first, (next(b) for _ in range(5))):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  c = loader(corpus, specs, window=32, seed=5)
  c.set_state(json.loads(json.dumps(state)))  # the state is plain data: it checkpoints as JSON
  for x, y in zip(after, (next(c) for _ in range(4))):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
    np.testing.assert_array_equal(x['weights'], y['weights'])
  d = loader(corpus, specs, window=32, seed=6)
  assert not np.array_equal(next(d)['tokens'], first[0]['tokens'])


def test_each_host_reads_its_own_shard(corpus):
  spec = [SourceSpec(corpus['duplex_prepared'])]
  its = [loader(corpus, spec, batch_size=4, shard_index=i, shard_count=2) for i in range(2)]
  shards = [collections.Counter(key(*r) for r in rows(next(it) for _ in range(3))) for it in its]
  assert sum(shards[0].values()) == sum(shards[1].values()) == 12
  assert not set(shards[0]) & set(shards[1])
  want = collections.Counter(key(*g) for g in direct_grids(corpus, 'duplex', 'lead'))
  assert shards[0] + shards[1] == want


def test_mixture_weights(corpus):
  specs = [
    SourceSpec(corpus['duplex_prepared'], weight=3.0),
    SourceSpec(corpus['tts_asr_prepared'], weight=1.0),
  ]
  it = loader(corpus, specs)
  got = [t for t, _ in rows(next(it) for _ in range(8))]  # 64 rows
  duplex = sum((t[9:] != CFG.audio_pad_id).any() for t in got)  # tts_asr on speak: listen all PAD
  assert abs(duplex / len(got) - 0.75) <= 0.1, duplex


def test_bad_loader_arguments(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"layout 'sideways' is not one of"):
    SourceSpec('x', layout='sideways')
  with pytest.raises(ValueError, match=r"speech_stream 'both' is not one of"):
    SourceSpec('x', speech_stream='both')
  with pytest.raises(ValueError, match='offset_frames -1 is negative'):
    SourceSpec('x', offset_frames=-1)
  with pytest.raises(FileNotFoundError, match='is not a prepared dataset: no summary.json'):
    loader(corpus, [SourceSpec(str(tmp_path))])
  with pytest.raises(ValueError, match='shard_index 2 is outside 0..1'):
    loader(corpus, [SourceSpec(corpus['duplex_prepared'])], shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='has no records for shard 30 of 31'):
    loader(corpus, [SourceSpec(corpus['duplex_prepared'])], shard_index=30, shard_count=31)


def test_trailing_text_extends_audio_without_trailing_silence(corpus, tmp_path):
  """A trimmed ASR utterance (speech up to its last frame): the trailing monologue is kept whole
  by extending the sample with PAD audio that weighs 0; the loader counts the extension."""
  frames, text = 10, 'what is two plus three'
  codes = np.random.default_rng(3).integers(0, 2048, (8, frames))
  np.save(tmp_path / 'u.npy', codes)
  line = {
    'id': 'u',
    'kind': 'tts_asr',
    'codes': {'model': 'u.npy'},
    'segments': [{'speaker': 'model', 'start': 0.0, 'end': frames / 12.5, 'text': text}],
  }
  (tmp_path / 'm.jsonl').write_text(json.dumps(line) + '\n')
  prepare(
    str(tmp_path / 'm.jsonl'), str(tmp_path / 'prep'), corpus['tok'], strict=True, progress=False
  )
  ids = corpus['tok'].encode(text)
  offset = 1  # text starts at frame 11 and ends at frame 10 + len(ids): all past the audio
  for stream in ('listen', 'speak'):
    spec = SourceSpec(
      str(tmp_path / 'prep'), layout='trail', offset_frames=offset, speech_stream=stream
    )
    batch = next(loader(corpus, [spec], batch_size=1))
    tokens, weights = batch['tokens'][0], batch['weights'][0]
    text_frames = tokens[0, 1:]  # text frame f sits at column f + 1
    np.testing.assert_array_equal(text_frames[frames + offset : frames + offset + len(ids)], ids)
    assert (weights[0, frames + offset + 1 : frames + offset + 1 + len(ids)] == 1.0).all()
    grown = frames + offset + len(ids)  # frames of the extended sample
    assert batch['extended_frames'][0] == grown - frames
    assert batch['cut_tokens'][0] == 0 and batch['pushed_frames'][0] == 0
    # the audio past frame 10 is PAD and never a target
    first = 1 if stream == 'speak' else 9
    offsets = np.asarray(CFG.grid_offsets)
    for c in range(first, first + 8):
      col = frames + offsets[c]
      assert (tokens[c, col : grown + offsets[c]] == CFG.audio_pad_id).all()
      assert (weights[c, col:] == 0).all()
      np.testing.assert_array_equal(tokens[c, offsets[c] : col], codes[c - first])
    # without the extension the whole sentence was cut: what prepare still reports at offset 0
  with open(tmp_path / 'prep' / 'summary.json') as f:
    assert json.load(f)['monologue_at_offset_0']['trail']['cut_tokens'] == len(ids)


def test_counts_of_pushes_cuts_and_extension_follow_the_window():
  """Each window counts the pushes and cuts of the sentences whose first text column it trains,
  and the extension frames it trains; over a record's windows they add up to the record's."""
  w = 16
  # trail, offset 0, 12 frames of audio: [1..14] at frames 4..17; [20, 21] wants 6 and is pushed
  # 12 to 18; twelve tokens wanting 12 are pushed 8 to 20. The text may grow by one window, to
  # 28 frames: 16 extension frames, and the last 4 tokens are cut.
  sentences = [
    ('model', 0, 4, list(range(1, 15))),
    ('model', 2, 6, [20, 21]),
    ('model', 8, 12, list(range(30, 42))),
  ]
  record = rec_lib.Record('r', 'tts_asr', {'model': np.zeros((8, 12), np.int16)}, sentences)
  spec = SourceSpec('x', layout='trail', speech_stream='listen')
  sample = record_grid(CFG, record, spec, 'trail', LW, max_extend=w)
  grid = sample.tokens
  assert grid.shape[1] == 28 + max(CFG.grid_offsets)
  np.testing.assert_array_equal(grid[0, 1 + 20 : 1 + 28], range(30, 38))  # text: column f + 1
  make = _WindowedGrid(CFG, spec, w, LW)
  seen = collections.Counter()
  for k in range(200):
    out = make(rec_lib.encode_record(record), np.random.default_rng(k))
    (start,) = [
      s for s in range(grid.shape[1] - w + 1) if (grid[:, s : s + w] == out['tokens']).all()
    ]
    targets = set(start + np.flatnonzero(out['weights'][0]))  # text weighs > 0 inside a sample
    assert out['pushed_frames'] == 12 * (1 + 18 in targets) + 8 * (1 + 20 in targets)
    assert out['cut_tokens'] == 4 * (1 + 20 in targets)
    assert out['extended_frames'] == len(targets & set(range(1 + 12, 1 + 28)))
    seen.update(pushed=int(out['pushed_frames']), cut=int(out['cut_tokens']))
  assert seen['pushed'] and seen['cut']  # some windows hold them


def _conversation():
  """A duplex record: a question split by a pause (frames 2-6, then 14-15), an answer from 18
  that a second question barges into at 20, and its answer at 29."""
  rng = np.random.default_rng(3)
  codes = {s: rng.integers(0, 2048, (8, 36)).astype(np.int16) for s in ('model', 'user')}
  sentences = [
    ('user', 2, 6, [13, 14, 25]),
    ('user', 14, 16, [55]),
    ('model', 18, 23, [8, 3, 42]),
    ('user', 20, 27, [13, 14, 21, 76]),
    ('model', 29, 33, [8, 3, 40]),
  ]
  return rec_lib.Record('c', 'duplex', codes, sentences)


def test_turn_starts_skip_a_pause_and_count_a_barge_in():
  assert rec_lib.turn_starts(_conversation()) == [2, 20]
  single = rec_lib.Record(
    's', 'tts_asr', {'model': np.zeros((8, 9), np.int16)}, [('model', 1, 5, [4])]
  )
  assert rec_lib.turn_starts(single) == []


@pytest.mark.parametrize('kind', ['duplex', 'tts_asr'])
def test_whole_turns_train_no_target_before_the_first_turn_in_the_window(kind):
  """With whole_turns, a duplex window draws what it draws without (same columns, same tokens)
  and trains the same targets, except those before the first user turn that starts inside it (a
  window at the conversation's start keeps all); a tts_asr window is unchanged."""
  record = _conversation()
  if kind == 'tts_asr':
    record = rec_lib.Record('s', 'tts_asr', {'model': record.codes['model']}, record.sentences[2:3])
  w, data = 12, rec_lib.encode_record(record)
  plain = _WindowedGrid(CFG, SourceSpec('x', offset_frames=2), w, LW)
  whole = _WindowedGrid(CFG, SourceSpec('x', offset_frames=2, whole_turns=True), w, LW)
  grid = record_grid(CFG, record, SourceSpec('x', offset_frames=2), 'lead', LW).tokens
  listen = CFG.grid_offsets[1 + CFG.num_codebooks]  # the user's frame f sits at column f + listen
  masked = 0
  for k in range(300):
    a, b = plain(data, np.random.default_rng(k)), whole(data, np.random.default_rng(k))
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
    (start,) = [
      s for s in range(grid.shape[1] - w + 1) if (grid[:, s : s + w] == a['tokens']).all()
    ]
    cut = 0
    if kind == 'duplex' and start > 0:
      cut = min([f + listen - start for f in (2, 20) if f + listen >= start], default=w)
    np.testing.assert_array_equal(b['weights'][:, cut:], a['weights'][:, cut:])
    assert not b['weights'][:, :cut].any()
    masked += bool(a['weights'][:, :cut].any())
  assert (masked > 0) == (kind == 'duplex')  # some windows lose targets, and only conversations

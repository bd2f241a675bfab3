"""grain pipeline: prepare -> grain -> batch equals building directly; resume; shards; mixture."""
import collections
import json

import numpy as np
import pytest

from flmjax.config import ModelConfig
from flmjax.data import manifest as mf
from flmjax.data import synthetic
from flmjax.data.grid import LossWeights, build_grid, pad_grid
from flmjax.data.monologue import layout_monologue
from flmjax.data.pipeline import SourceSpec, make_loader
from flmjax.data.prepare import prepare
from flmjax.data.tokenizer import load_tokenizer

CFG = ModelConfig.tiny()
LW = LossWeights()
BIG = 128  # longer than any synthetic sample's grid: windows start at column 0


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  paths = synthetic.generate(str(root / 'syn'), seed=1, num_tts_asr=24, num_duplex=24,
                             num_heldout=4)
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
    sentences = [(s.start_frame, s.end_frame, paths['tok'].encode(s.text))
                 for s in entry.segments if s.speaker == speaker]
    text, _, _ = layout_monologue(sentences, frames, mode, offset, CFG.text_wait_id)
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


def test_random_windows_are_slices_of_the_grid(corpus):
  it = loader(corpus, [SourceSpec(corpus['duplex_prepared'])], window=16)
  full = direct_grids(corpus, 'duplex', 'lead', window=BIG)
  starts = set()
  for tokens, weights in rows(next(it) for _ in range(3)):
    assert (weights[:, 0] == 0).all()
    hits = [(s, i) for i, (t, w) in enumerate(full) for s in range(BIG - 16 + 1)
            if (t[:, s:s + 16] == tokens).all() and (w[:, s + 1:s + 16] == weights[:, 1:]).all()]
    assert hits, 'a window is not a slice of any sample grid'
    starts.add(hits[0][0])
  assert len(starts) > 3  # windows start at random columns


def test_deterministic_and_resume(corpus):
  specs = [SourceSpec(corpus['duplex_prepared']), SourceSpec(corpus['tts_asr_prepared'],
                                                             layout='mixed')]
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
  specs = [SourceSpec(corpus['duplex_prepared'], weight=3.0),
           SourceSpec(corpus['tts_asr_prepared'], weight=1.0)]
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

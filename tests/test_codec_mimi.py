"""Mimi in JAX against the official fixtures (golden/mimi_small, golden/mimi), float32 on CPU."""

import json

import numpy as np
import pytest

from flmjax.checkpoint import safetensors_io
from flmjax.codec import Mimi, MimiCheckpointError, MimiConfig, load_mimi
from flmjax.codec.base import FRAME_SIZE
from flmjax.codec.mimi_checkpoint import checkpoint_layout, random_state_dict

pytestmark = pytest.mark.slow  # compiles Mimi (encoder and decoder, batch and streaming)

FRAME = FRAME_SIZE  # samples per 80 ms frame


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def small(golden_dir):
  return load_mimi(str(golden_dir / 'mimi_small'))


@pytest.fixture(scope='module')
def fixture(golden_dir):
  return dict(np.load(golden_dir / 'mimi_small' / 'mimi.npz'))


def stream_encode(mimi, pcm, state=None):
  """pcm [B,T] -> codes [B,K,F], one frame per call."""
  state = mimi.init_stream(pcm.shape[0]) if state is None else state
  codes = []
  for f in range(pcm.shape[1] // FRAME):
    state, c = mimi.encode_step(state, pcm[:, f * FRAME : (f + 1) * FRAME])
    codes.append(np.asarray(c))
  return np.stack(codes, -1), state


def stream_decode(mimi, codes, state=None):
  """codes [B,K,F] -> pcm [B,F*1920], one column per call."""
  state = mimi.init_stream(codes.shape[0]) if state is None else state
  out = []
  for f in range(codes.shape[2]):
    state, y = mimi.decode_step(state, codes[:, :, f])
    out.append(np.asarray(y))
  return np.concatenate(out, -1), state


def test_config_matches_fixtures(golden_dir, small):
  kwargs = json.loads((golden_dir / 'mimi' / 'manifest.json').read_text())['kwargs']
  assert MimiConfig.from_kwargs(kwargs) == MimiConfig.full()
  assert small.cfg == MimiConfig.small()
  assert small.cfg.context == 32 and small.cfg.frame_size == FRAME


def test_layout_matches_manifest(golden_dir):
  manifest = json.loads((golden_dir / 'mimi' / 'manifest.json').read_text())
  layout = checkpoint_layout(MimiConfig.full())
  assert len(layout) == 318
  assert layout == {k: tuple(v) for k, v in manifest['tensors'].items()}
  assert sum(int(np.prod(s)) for s in layout.values()) == manifest['num_params']


def test_every_parameter_has_logical_axes(small):
  import jax

  from flmjax import sharding

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  leaves = jax.tree.leaves(small.params)
  axes = jax.tree.leaves(small.axes, is_leaf=lambda a: isinstance(a, tuple))
  assert len(leaves) == len(axes)
  for leaf, names in zip(leaves, axes):
    assert len(names) == leaf.ndim
    sharding.logical_to_spec(names, leaf.shape, mesh)  # raises on a name without a rule


def test_batch_parity(small, fixture):
  pcm = fixture['pcm'][None]
  latent = np.asarray(small.encode_latent(pcm))  # [1,F,D]
  assert rel(latent, fixture['latent'].transpose(0, 2, 1)) <= 1e-4
  codes = np.asarray(small.encode(pcm))
  assert codes.shape == (1, 8, 62) and codes.dtype == np.int32
  assert (codes == fixture['codes']).mean() >= 0.995
  decoded = np.asarray(small.decode(fixture['codes']))
  assert decoded.shape == (1, 62 * FRAME) and decoded.dtype == np.float32
  assert rel(decoded, fixture['decoded'][:, 0]) <= 1e-4


def test_stream_parity(small, fixture):
  pcm = fixture['pcm'][None]
  codes, _ = stream_encode(small, pcm)
  assert (codes == fixture['codes_stream']).mean() >= 0.995
  decoded, _ = stream_decode(small, fixture['codes'])
  assert rel(decoded, fixture['decoded_stream'][:, 0]) <= 1e-4
  # The fixture really tells the modes apart: past the context they disagree.
  assert (fixture['codes_stream'] != fixture['codes']).mean() > 0.05


def test_stream_equals_batch_within_context(small, fixture):
  frames = small.cfg.context // small.cfg.resample_stride  # 16 frames = 32 steps at 25 Hz
  pcm = fixture['pcm'][None, : frames * FRAME]
  codes, _ = stream_encode(small, pcm)
  np.testing.assert_array_equal(codes, np.asarray(small.encode(pcm)))
  decoded, _ = stream_decode(small, fixture['codes'][:, :, :frames])
  batch = np.asarray(small.decode(fixture['codes'][:, :, :frames]))
  assert rel(decoded, batch) <= 1e-5


def test_sessions_are_independent(small, fixture):
  pcm = fixture['pcm']
  sessions = np.stack(
    [pcm[: 20 * FRAME], pcm[30 * FRAME : 50 * FRAME], 0.5 * pcm[5 * FRAME : 25 * FRAME]]
  )  # [3,T]
  codes, _ = stream_encode(small, sessions)
  decoded, _ = stream_decode(small, codes)
  for b in range(3):
    one_codes, _ = stream_encode(small, sessions[b : b + 1])
    np.testing.assert_array_equal(codes[b : b + 1], one_codes)
    one_pcm, _ = stream_decode(small, one_codes)
    assert rel(decoded[b : b + 1], one_pcm) <= 1e-5
  assert (codes[0] != codes[1]).any()


def test_reset_slots(small, fixture):
  pcm = fixture['pcm']
  a, b = pcm[: 24 * FRAME], pcm[24 * FRAME : 48 * FRAME]
  # Slot 0 plays a[:12] then restarts on b; slot 1 plays a without interruption.
  first, state = stream_encode(small, np.stack([a[: 12 * FRAME], a[: 12 * FRAME]]))
  dec_first, state = stream_decode(small, first, state)
  state = small.reset_slots(state, np.array([True, False]))
  second, state = stream_encode(small, np.stack([b[: 12 * FRAME], a[12 * FRAME :]]), state)
  dec_second, _ = stream_decode(small, second, state)

  fresh_b, _ = stream_encode(small, b[None, : 12 * FRAME])
  np.testing.assert_array_equal(second[0], fresh_b[0])
  whole_a, _ = stream_encode(small, a[None])
  np.testing.assert_array_equal(np.concatenate([first[1], second[1]], -1), whole_a[0])
  fresh_dec, _ = stream_decode(small, fresh_b)
  assert rel(dec_second[0], fresh_dec[0]) <= 1e-5
  whole_dec, _ = stream_decode(small, whole_a)
  assert rel(np.concatenate([dec_first[1], dec_second[1]]), whole_dec[0]) <= 1e-5


def write_checkpoint(directory, state_dict, config_json):
  directory.mkdir(exist_ok=True)
  path = directory / 'mimi.safetensors'
  safetensors_io.write_file(
    str(path), [(k, np.float32, v.shape) for k, v in state_dict.items()], state_dict.__getitem__
  )
  (directory / 'config.json').write_text(config_json)
  return path


def test_random_weights_round_trip_through_safetensors(tmp_path, golden_dir):
  cfg = MimiConfig.small()
  config_json = (golden_dir / 'mimi_small' / 'config.json').read_text()
  write_checkpoint(tmp_path / 'ckpt', random_state_dict(cfg, seed=3), config_json)
  loaded, direct = load_mimi(str(tmp_path / 'ckpt')), Mimi.random(cfg, seed=3)
  assert loaded.cfg == cfg
  pcm = np.sin(np.arange(4 * FRAME, dtype=np.float32) * 0.01)[None]
  codes = np.asarray(loaded.encode(pcm))
  np.testing.assert_array_equal(codes, np.asarray(direct.encode(pcm)))
  assert len(np.unique(codes)) > 4  # random weights still give varied codes


def test_checkpoint_errors(tmp_path, golden_dir):
  cfg = MimiConfig.small()
  config_json = (golden_dir / 'mimi_small' / 'config.json').read_text()
  good = random_state_dict(cfg)

  missing = dict(good)
  del missing['decoder.model.14.conv.conv.bias']
  write_checkpoint(tmp_path / 'missing', missing, config_json)
  with pytest.raises(MimiCheckpointError, match=r'1 missing key.*decoder\.model\.14'):
    load_mimi(str(tmp_path / 'missing'))

  renamed = dict(good)
  renamed['encoder.model.99.conv.conv.bias'] = renamed.pop('encoder.model.0.conv.conv.bias')
  write_checkpoint(tmp_path / 'renamed', renamed, config_json)
  with pytest.raises(MimiCheckpointError, match=r'unexpected.*encoder\.model\.99'):
    load_mimi(str(tmp_path / 'renamed'))

  shaped = dict(good)
  shaped['downsample.conv.conv.conv.weight'] = np.zeros((64, 64, 3), np.float32)
  write_checkpoint(tmp_path / 'shaped', shaped, config_json)
  with pytest.raises(
    MimiCheckpointError,
    match=r'downsample.*shape \(64, 64, 3\), expected '
    r'\(64, 64, 4\)',
  ):
    load_mimi(str(tmp_path / 'shaped'))

  path = write_checkpoint(tmp_path / 'cut', good, config_json)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 1000])
  with pytest.raises(MimiCheckpointError, match='truncated'):
    load_mimi(str(path))

  with pytest.raises(MimiCheckpointError, match='no such'):
    load_mimi(str(tmp_path / 'nowhere.safetensors'))
  # The small checkpoint without its config.json is read as the full config: named mismatch.
  bare = tmp_path / 'bare'
  bare.mkdir()
  weights = (golden_dir / 'mimi_small' / 'mimi.safetensors').read_bytes()
  (bare / 'm.safetensors').write_bytes(weights)
  with pytest.raises(MimiCheckpointError, match=r'full config.*192 missing key'):
    load_mimi(str(bare))


def test_bad_input(small):
  pcm = np.zeros((1, 2 * FRAME), np.float32)
  with pytest.raises(ValueError, match='16000 Hz.*24000 Hz.*resample'):
    small.encode(pcm, sample_rate=16000)
  with pytest.raises(ValueError, match='mono'):
    small.encode(np.zeros((1, 2, 2 * FRAME), np.float32))  # stereo
  with pytest.raises(ValueError, match='empty audio'):
    small.encode(np.zeros((1, 0), np.float32))
  bad = pcm.copy()
  bad[0, 7] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    small.encode(bad)
  state = small.init_stream(1)
  with pytest.raises(ValueError, match='NaN'):
    small.encode_step(state, bad[:, :FRAME])
  with pytest.raises(ValueError, match='one frame'):
    small.encode_step(state, pcm)
  codes = np.zeros((1, 8, 3), np.int32)
  codes[0, 2, 1] = 2048
  with pytest.raises(ValueError, match=r'out of range \[0, 2048\).*max 2048'):
    small.decode(codes)
  with pytest.raises(ValueError, match='out of range'):
    small.decode_step(state, -np.ones((1, 8), np.int32))
  with pytest.raises(ValueError, match='8 codebooks'):
    small.decode(np.zeros((1, 7, 3), np.int32))

"""flmjax.checkpoint.safetensors_io over the `safetensors` library: its checks (truncation, a header
that disagrees with itself, a dtype flmjax does not read) raise one-line CorruptCheckpointErrors,
bfloat16 round-trips bit for bit, and save_official holds no more than a shard at a time."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import flmjax
from flmjax.checkpoint import safetensors_io as st


def _write(path, tensors):
  specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
  return st.write_file(str(path), specs, tensors.__getitem__)


def _one_line(e):
  return '\n' not in str(e.value)


def test_round_trip_keeps_dtypes_and_bits(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    'bf16': rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
    'f32': rng.standard_normal((4,)).astype(np.float32),
    'i64': np.arange(6, dtype=np.int64).reshape(2, 3),
    'empty': np.zeros((2, 0), np.float16),
  }
  assert _write(tmp_path / 'a.safetensors', tensors) == sum(v.nbytes for v in tensors.values())
  infos = st.read_header(str(tmp_path / 'a.safetensors'))
  assert {k: (i.dtype, i.shape) for k, i in infos.items()} == {
    k: (v.dtype, v.shape) for k, v in tensors.items()
  }
  for k, v in tensors.items():
    got = st.read_tensor(infos[k])
    assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), k
  with safetensors.safe_open(str(tmp_path / 'a.safetensors'), framework='numpy') as f:
    assert f.metadata() == {'format': 'pt'}  # what torch's loaders look for


def test_truncation_and_trailing_bytes_are_named(tmp_path):
  path = tmp_path / 'a.safetensors'
  _write(path, {'w': np.ones((8, 8), np.float32)})
  data = path.read_bytes()
  for cut in (data[:-4], data[:20], data + b'\0' * 8):
    path.write_bytes(cut)
    with pytest.raises(st.CorruptCheckpointError, match=r'a\.safetensors: truncated') as e:
      st.read_header(str(path))
    assert _one_line(e)
  path.write_bytes(data[:5])
  with pytest.raises(st.CorruptCheckpointError, match=r'\(5 bytes, no header\)'):
    st.read_header(str(path))


def _with_header(path, edit):
  """Rewrites the header of the safetensors file at `path` with `edit(header)`."""
  data = path.read_bytes()
  (n,) = struct.unpack('<Q', data[:8])
  header = edit(json.loads(data[8 : 8 + n]))
  blob = json.dumps(header).encode()
  blob += b' ' * (-len(blob) % 8)
  path.write_bytes(struct.pack('<Q', len(blob)) + blob + data[8 + n :])


def test_a_shape_that_disagrees_with_the_bytes_is_corrupt(tmp_path):
  path = tmp_path / 'a.safetensors'
  _write(path, {'w': np.ones((4, 4), np.float32)})

  def grow(h):
    h['w']['shape'] = [4, 5]
    return h

  _with_header(path, grow)
  with pytest.raises(st.CorruptCheckpointError, match='corrupt safetensors header') as e:
    st.read_header(str(path))
  assert _one_line(e)


def test_a_dtype_flmjax_does_not_read_is_named(tmp_path):
  path = tmp_path / 'a.safetensors'
  safetensors.numpy.save_file({'w': np.zeros(4, np.uint16)}, str(path))
  with pytest.raises(st.CorruptCheckpointError, match=r"tensor 'w' is U16, a dtype flmjax does"):
    st.read_header(str(path))
  _write(path, {'w': np.zeros(4, np.int16)})

  def unknown(h):
    h['w']['dtype'] = 'Q7'
    return h

  _with_header(path, unknown)
  with pytest.raises(st.CorruptCheckpointError, match='corrupt safetensors header.*Q7'):
    st.read_header(str(path))


def test_writer_refuses_what_its_specs_do_not_say(tmp_path):
  path = str(tmp_path / 'a.safetensors')
  with pytest.raises(ValueError, match=r'produced shape \(3,\), header says \(4,\)'):
    st.write_file(path, [('w', np.float32, (4,))], lambda k: np.zeros(3, np.float32))
  with pytest.raises(ValueError, match='dtype uint16 is not one flmjax reads back'):
    st.write_file(path, [('w', np.uint16, (4,))], lambda k: np.zeros(4, np.uint16))


def test_save_official_holds_one_shard_at_a_time(tiny_model, tmp_path, monkeypatch):
  """The library's writer takes a file's tensors together: save_official's shards bound that."""
  held = []
  save_file = safetensors.numpy.save_file

  def recording(tensors, path, metadata=None):
    held.append(sum(v.nbytes for v in tensors.values()))
    return save_file(tensors, path, metadata=metadata)

  monkeypatch.setattr(safetensors.numpy, 'save_file', recording)
  limit = 2**20
  out = flmjax.save_official(tiny_model, str(tmp_path / 'x'), max_shard_bytes=limit)
  shards = [n for n in os.listdir(out) if n.endswith('.safetensors')]
  assert len(held) == len(shards) > 2
  index = json.loads(open(os.path.join(out, 'model.safetensors.index.json')).read())
  assert sum(held) == index['metadata']['total_size']
  largest = 4 * max(np.prod(s) for s in flmjax.official_shapes(tiny_model.cfg).values())
  assert largest < limit and max(held) <= limit  # (a tensor above the limit gets a shard alone)

"""Issue 2: official checkpoint layout in and out, its errors, and sharded loading."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import flmjax
from flmjax import sharding as shd
from flmjax.checkpoint import safetensors_io as st


def flat_params(model):
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def read_all(path):
  infos = st.read_header(str(path))
  return {k: np.array(st.read_tensor(i)) for k, i in infos.items()}


def write_dir(dst, tensors, config):
  os.makedirs(dst, exist_ok=True)
  (dst / 'config.json').write_text(json.dumps(config))
  specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
  st.write_file(str(dst / 'model.safetensors'), specs, lambda k: tensors[k])
  return dst


@pytest.fixture(scope='module')
def golden_tensors(tiny_dir):
  return read_all(tiny_dir / 'model.safetensors')


@pytest.fixture(scope='module')
def golden_config(tiny_dir):
  return json.loads((tiny_dir / 'config.json').read_text())


def test_round_trip_is_bit_identical(tiny_model, tiny_dir, tmp_path):
  out = flmjax.save_official(tiny_model, str(tmp_path / 'export'))
  again = flmjax.load_official(out, dtype='float32')
  a, b = flat_params(tiny_model), flat_params(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
  ours = st.read_header(os.path.join(out, 'model.safetensors'))
  golden = st.read_header(str(tiny_dir / 'model.safetensors'))
  assert {k: (i.shape, i.dtype) for k, i in ours.items()} == {
    k: (i.shape, i.dtype) for k, i in golden.items()
  }
  assert json.loads(open(os.path.join(out, 'config.json')).read()) == {
    **json.loads((tiny_dir / 'config.json').read_text()),
    'architectures': ['FLMAudioForCausalLM'],
  }


def test_export_loads_in_torch_with_the_official_keys(tiny_model, tiny_dir, tmp_path):
  """A strict load_state_dict needs exactly the official keys, shapes and dtypes."""
  import safetensors.torch as torch_st  # the [test] extra installs torch and safetensors

  out = flmjax.save_official(tiny_model, str(tmp_path / 'export'))
  ours = torch_st.load_file(os.path.join(out, 'model.safetensors'))
  ref = torch_st.load_file(str(tiny_dir / 'model.safetensors'))
  assert ours.keys() == ref.keys()
  for k in ref:
    assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype, k
    assert bool((ours[k] == ref[k]).all()), k


def test_sharded_bf16_save_with_index(tiny_model, tmp_path):
  out = flmjax.save_official(
    tiny_model, str(tmp_path / 'bf16'), dtype='bfloat16', max_shard_bytes=2**20
  )
  names = sorted(os.listdir(out))
  index = json.loads(open(os.path.join(out, 'model.safetensors.index.json')).read())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 1 and all(s in names for s in shards) and 'model.safetensors' not in names
  assert set(index['weight_map']) == set(flmjax.official_shapes(tiny_model.cfg))
  assert json.loads(open(os.path.join(out, 'config.json')).read())['torch_dtype'] == 'bfloat16'
  loaded = flmjax.load_official(out, dtype='float32')
  a, b = flat_params(tiny_model), flat_params(loaded)
  for k in a:  # bf16 storage: exact after rounding both sides to bf16
    np.testing.assert_array_equal(a[k].astype(st.DTYPES['BF16']).astype(np.float32), b[k])


def test_save_refuses_to_overwrite_and_is_atomic(tiny_model, tmp_path, monkeypatch):
  target = tmp_path / 'ckpt'
  flmjax.save_official(tiny_model, str(target))
  with pytest.raises(FileExistsError, match='overwrite=True'):
    flmjax.save_official(tiny_model, str(target))
  calls = []

  def crash(path, specs, produce):
    calls.append(path)
    raise OSError('disk full')

  monkeypatch.setattr(st, 'write_file', crash)
  with pytest.raises(OSError, match='disk full'):
    flmjax.save_official(tiny_model, str(tmp_path / 'crashed'))
  with pytest.raises(OSError):
    flmjax.save_official(tiny_model, str(target), overwrite=True)
  assert calls and not (tmp_path / 'crashed').exists()
  assert sorted(os.listdir(tmp_path)) == ['ckpt']  # no temp dir left behind
  assert flmjax.load_official(str(target), dtype='float32') is not None  # old one intact


def _broken(tmp_path, golden_tensors, golden_config, drop=(), add=None, reshape=None, config=None):
  tensors = {k: v for k, v in golden_tensors.items() if k not in drop}
  tensors.update(add or {})
  for k, shape in (reshape or {}).items():
    tensors[k] = np.zeros(shape, np.float32)
  return write_dir(tmp_path / 'broken', tensors, {**golden_config, **(config or {})})


def test_missing_keys_are_listed(tmp_path, golden_tensors, golden_config):
  drop = ('model.norm.weight', 'aud_output_layers.lm_heads.3.weight')
  path = _broken(tmp_path, golden_tensors, golden_config, drop=drop)
  with pytest.raises(flmjax.CheckpointError, match='missing keys') as e:
    flmjax.load_official(str(path))
  assert all(k in str(e.value) for k in drop)


def test_unexpected_keys_are_listed(tmp_path, golden_tensors, golden_config):
  path = _broken(
    tmp_path,
    golden_tensors,
    golden_config,
    add={'model.rotary_emb.inv_freq': np.zeros(8, np.float32)},
  )
  with pytest.raises(flmjax.CheckpointError, match=r'unexpected keys.*model\.rotary_emb\.inv_freq'):
    flmjax.load_official(str(path))


def test_shape_mismatch_names_key_expected_and_found(tmp_path, golden_tensors, golden_config):
  path = _broken(
    tmp_path,
    golden_tensors,
    golden_config,
    reshape={'model.layers.1.mlp.up_proj.weight': (161, 64)},
  )
  with pytest.raises(
    flmjax.CheckpointError,
    match=r'model\.layers\.1\.mlp\.up_proj\.weight: expected \(160, 64\), '
    r'found \(161, 64\)',
  ):
    flmjax.load_official(str(path))


def test_config_and_weights_disagree(tmp_path, golden_tensors, golden_config):
  path = _broken(tmp_path, golden_tensors, golden_config, config={'num_hidden_layers': 3})
  with pytest.raises(
    flmjax.CheckpointError, match=r'config\.json and the weights disagree(.|\n)*model\.layers\.2\.'
  ):
    flmjax.load_official(str(path))


def test_truncated_safetensors(tmp_path, tiny_dir):
  dst = tmp_path / 'trunc'
  shutil.copytree(tiny_dir, dst)
  f = dst / 'model.safetensors'
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(flmjax.CorruptCheckpointError, match=r'model\.safetensors: truncated'):
    flmjax.load_official(str(dst))
  f.write_bytes(data[:4])
  with pytest.raises(flmjax.CorruptCheckpointError, match='no header'):
    flmjax.load_official(str(dst))


def test_corrupt_safetensors_header(tmp_path, tiny_dir):
  dst = tmp_path / 'corrupt'
  shutil.copytree(tiny_dir, dst)
  f = dst / 'model.safetensors'
  data = bytearray(f.read_bytes())
  data[8:20] = b'\xff' * 12
  f.write_bytes(bytes(data))
  with pytest.raises(flmjax.CorruptCheckpointError, match='corrupt safetensors header'):
    flmjax.load_official(str(dst))


def test_missing_files(tmp_path, tiny_dir):
  with pytest.raises(flmjax.CheckpointError, match='config.json not found'):
    flmjax.load_official(str(tmp_path))
  (tmp_path / 'config.json').write_text((tiny_dir / 'config.json').read_text())
  with pytest.raises(flmjax.CheckpointError, match='neither model.safetensors.index.json'):
    flmjax.load_official(str(tmp_path))


def test_sharded_load_places_by_rules_and_matches(tiny_dir, tiny_model):
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = flmjax.load_official(str(tiny_dir), dtype='float32', mesh=mesh)
  for path, var in nnx.to_flat_state(nnx.state(sharded)):
    value = var.get_value()
    want = shd.logical_to_spec(var.get_metadata()['axes'], value.shape, mesh)
    assert value.sharding.spec == want, path
    ref = np.asarray(flat_params(tiny_model)[path])  # padded for tensor=1: vocab 384, not 512
    value = np.asarray(value)
    np.testing.assert_array_equal(
      value[tuple(slice(0, n) for n in ref.shape)], ref, err_msg=str(path)
    )
    for axis, n in enumerate(ref.shape):  # the rest is padding: zeros
      assert not np.any(np.take(value, np.arange(n, value.shape[axis]), axis=axis)), path
  # e.g. q [L,D,N,H] = ('layers','embed','q_heads','head_dim') -> (None,'fsdp','tensor',None).
  want = jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert sharded.backbone.q[...].sharding.spec == want
  r = np.load(tiny_dir / 'forward.npz')
  # Batch 4 so that it splits over data x fsdp.
  args = tuple(
    np.concatenate([a, a[::-1]])
    for a in (r['text'], r['speak'], r['listen'], r['depth_tokens'][..., :-1])
  )
  ref = tiny_model(*args)

  @nnx.jit
  def fwd(m, *a):
    return m(*a)

  batch = shd.batch_sharding(mesh, 2)
  out = fwd(sharded, *[jax.device_put(a, shd.batch_sharding(mesh, a.ndim)) for a in args])
  assert batch.spec[0] == ('data', 'fsdp')
  for name in ('hidden', 'text_logits', 'depth_logits'):
    np.testing.assert_allclose(
      np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), rtol=1e-5, atol=1e-5
    )

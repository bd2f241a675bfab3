"""Train step: loss alignment, sharded == single device, grad accumulation, sharding specs,
config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.train import data as data_lib
from flmjax.train import state as st
from flmjax.train import step as sp
from flmjax.train.config import (
  MeshConfig,
  OptimConfig,
  StageConfig,
  TrainConfig,
  TrainConfigError,
  load_config_file,
)

LR = 3e-3


def _tc(**kw):
  # Adam's eps 1e-3 keeps the first update g / (|g| + eps) well conditioned: with the default
  # 1e-8 it is sign(g) for near-zero gradients, which summation order alone can flip.
  base = dict(
    model=ModelConfig.tiny(),
    stages=(StageConfig('a', 4, random_data=True),),
    run_dir='/nonexistent',
    window=12,
    batch_size=8,
    compute_dtype='float32',
    optim=OptimConfig(eps=1e-3),
  )
  return TrainConfig(**{**base, **kw})


@pytest.fixture(scope='module')
def batch_np():
  return next(data_lib.make_stage_loader(_tc(), 0))


def _run(tc, mesh, batch_np):
  spec = st.state_spec(tc, mesh)
  state = st.init_state(spec, tc)
  before = jax.device_get(state.params)
  fn = sp.jit_train_step(spec, tc, mesh)
  new, metrics = fn(state, data_lib.to_global(batch_np, sp.batch_shardings(mesh)), jnp.float32(LR))
  return before, new, jax.device_get(metrics), spec


@pytest.fixture(scope='module')
def single(batch_np):
  return _run(_tc(), shd.make_mesh(1, 1, 1), batch_np)


def test_loss_matches_numpy_reference(single, batch_np):
  """Column j predicts column j+1: the step's loss equals a numpy weighted CE on the logits."""
  before, _, metrics, spec = single
  model = nnx.merge(spec.graphdef, before)
  tok, w = batch_np['tokens'], batch_np['weights']
  C = 8
  out = model(
    tok[:, 0, :-1],
    tok[:, 1:9, :-1].transpose(0, 2, 1),
    tok[:, 9:17, :-1].transpose(0, 2, 1),
    tok[:, 1:8, 1:].transpose(0, 2, 1),
  )

  def ce(logits, target):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - np.take_along_axis(logits, target[..., None], -1)[..., 0]

  text_ce = ce(out.text_logits, tok[:, 0, 1:])
  audio_ce = ce(out.depth_logits, tok[:, 1:9, 1:].transpose(0, 2, 1)).transpose(0, 2, 1)
  wt, wa = w[:, 0, 1:], w[:, 1 : 1 + C, 1:]
  assert (w[:, 9:] == 0).all() and wt.sum() > 0 and wa.sum() > 0
  want = ((wt * text_ce).sum() + (wa * audio_ce).sum()) / (wt.sum() + wa.sum())
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)
  np.testing.assert_allclose(
    metrics['loss_semantic'], (wa[:, 0] * audio_ce[:, 0]).sum() / wa[:, 0].sum(), rtol=1e-5
  )
  words = (wt > 0) & (tok[:, 0, 1:] != model.cfg.text_wait_id)
  pred = np.asarray(out.text_logits).argmax(-1)
  np.testing.assert_allclose(metrics['acc_text'], (pred == tok[:, 0, 1:])[words].mean(), atol=1e-6)


@pytest.mark.slow
def test_sharded_step_matches_single_device(single, batch_np):
  """(data 2, fsdp 2, tensor 2) vs 1 device, float32: loss rtol 1e-5, params atol 1e-6 (the
  update is lr-sized, 3e-3, so this checks it to ~3e-4 relative)."""
  _, ref, ref_m, _ = single
  _, new, m, _ = _run(_tc(), shd.make_mesh(2, 2, 2), batch_np)
  np.testing.assert_allclose(m['loss'], ref_m['loss'], rtol=1e-5)
  np.testing.assert_allclose(m['grad_norm'], ref_m['grad_norm'], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(ref.params)):
    # The vocab is padded for tensor=2 here (512) and tensor=1 there (384): padding stays zero.
    common = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))
    np.testing.assert_allclose(a[common], b[common], atol=1e-6, rtol=0)
    for axis, n in enumerate(b.shape):
      assert not np.any(np.take(a, np.arange(n, a.shape[axis]), axis=axis))
  q = new.params['backbone']['q']
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch(single, batch_np):
  """4 micro-batches of 2 rows: the same update as one batch of 8 (float32, atol 1e-6)."""
  before, ref, ref_m, _ = single
  _, new, m, _ = _run(_tc(grad_accum=4), shd.make_mesh(2, 1, 1), batch_np)
  np.testing.assert_allclose(m['loss'], ref_m['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  moved = [
    np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(before))
  ]
  assert min(moved) > 0  # every parameter got an update


def test_sharding_specs_follow_rules():
  mesh = shd.make_mesh(2, 2, 2)
  tc = _tc()
  spec = st.state_spec(tc, mesh)
  _, abstract_state = st.graphdef_and_abstract(st.compute_model_config(tc, mesh))
  P = jax.sharding.PartitionSpec
  for path, var in nnx.to_flat_state(abstract_state):
    want = shd.logical_to_spec(var.get_metadata()['axes'], var.get_value().shape, mesh)
    got = spec.shardings.params
    for k in path:
      got = got[k]
    assert got.spec == want, path
  p = spec.shardings.params
  assert p['backbone']['text_embed'].spec == P('tensor', 'fsdp')  # vocab->tensor, embed->fsdp
  assert p['backbone']['down'].spec == P(None, 'tensor', 'fsdp')  # (layers, mlp, embed)
  assert p['backbone']['input_norm'].spec == P(None, None)
  assert p['depth_transformer']['qkv'].spec == P(None, None, 'fsdp', 'tensor')  # [L,3,d,n]
  adam = spec.shardings.opt_state[1]  # (clip, adam, decay)
  assert adam.mu['backbone']['down'].spec == p['backbone']['down'].spec
  assert adam.nu['depth_transformer']['qkv'].spec == p['depth_transformer']['qkv'].spec
  assert adam.count.spec == P()
  assert sp.batch_shardings(mesh)['tokens'].spec == P(('data', 'fsdp'), None, None)


def test_decay_mask_skips_norms_and_biases():
  mask = st.decay_mask(
    {
      'backbone': {'q': 1, 'q_bias': 1, 'input_norm': 1, 'text_embed': 1},
      'depth_transformer': {'ln_f': 1, 'qkv': 1},
    }
  )
  assert mask == {
    'backbone': {'q': True, 'q_bias': False, 'input_norm': False, 'text_embed': True},
    'depth_transformer': {'ln_f': False, 'qkv': True},
  }


def test_config_errors_name_the_problem(tmp_path):
  with pytest.raises(TrainConfigError, match='batch_size 6 is not a multiple of grad_accum 4'):
    _tc(batch_size=6, grad_accum=4)
  with pytest.raises(TrainConfigError, match="remat 'some'"):
    _tc(remat='some')
  with pytest.raises(TrainConfigError, match="stage 'x': no data sources"):
    StageConfig('x', 3)
  with pytest.raises(TrainConfigError, match="stage 'x': warmup_steps 5"):
    StageConfig('x', 3, warmup_steps=5, random_data=True)
  with pytest.raises(TrainConfigError, match='stage names must be unique'):
    _tc(stages=(StageConfig('a', 1, random_data=True),) * 2)
  with pytest.raises(TrainConfigError, match='8 devices are not a multiple of fsdp\\*tensor = 3'):
    MeshConfig(fsdp=3).resolve(8)
  bad = tmp_path / 'bad.py'
  bad.write_text('X = 1\n')
  with pytest.raises(TrainConfigError, match='bad.py: defines no get_config'):
    load_config_file(str(bad))
  with pytest.raises(TrainConfigError, match='not found'):
    load_config_file(str(tmp_path / 'missing.py'))
  with pytest.raises(TrainConfigError, match=r"batch\['tokens'\] has shape \(2, 17, 12\)"):
    data_lib.check_batch(
      _tc(), {'tokens': np.zeros((2, 17, 12)), 'weights': np.zeros((2, 17, 12))}, 'stage a'
    )


def test_a_stage_may_have_its_own_window_and_batch():
  stages = (
    StageConfig('short', 2, random_data=True, window=6, batch_size=16),
    StageConfig('long', 2, random_data=True),
  )
  tc = _tc(stages=stages)
  assert [(tc.stage_window(i), tc.stage_batch_size(i)) for i in range(2)] == [(6, 16), (12, 8)]
  for i, shape in enumerate(((16, 17, 6), (8, 17, 12))):
    batch = next(data_lib.make_stage_loader(tc, i))
    assert batch['tokens'].shape == batch['weights'].shape == shape
    data_lib.check_batch(tc, batch, 'stage', i)
  with pytest.raises(TrainConfigError, match=r"batch\['tokens'\] has shape \(8, 17, 12\)"):
    data_lib.check_batch(tc, batch, "stage 'short'", 0)
  with pytest.raises(TrainConfigError, match="stage 'b': window must be >= 2 columns, got 1"):
    _tc(stages=(StageConfig('b', 1, random_data=True, window=1),))
  with pytest.raises(TrainConfigError, match="stage 'b': window 5000 exceeds the model's"):
    _tc(stages=(StageConfig('b', 1, random_data=True, window=5000),))
  with pytest.raises(TrainConfigError, match="stage 'b': batch_size 6 is not a multiple of grad"):
    _tc(grad_accum=4, stages=(StageConfig('b', 1, random_data=True, batch_size=6),))
  with pytest.raises(TrainConfigError, match="stage 'b': batch_size is 0; it must be an integer"):
    _tc(stages=(StageConfig('b', 1, random_data=True, batch_size=0),))


def test_train_cli_reports_bad_usage(tmp_path, capsys):
  from flmjax import cli

  assert cli.main(['train']) == 1  # one stderr line, exit status 1, like every flmjax command
  assert '--config is required' in capsys.readouterr().err
  assert cli.main(['train', '--config', str(tmp_path / 'none.py')]) == 1
  assert 'none.py not found' in capsys.readouterr().err
  assert cli.main(['train', '--bogus_flag=1']) == 1
  assert 'bogus_flag' in capsys.readouterr().err


def test_schedule_positions_and_learning_rates():
  from flmjax.train.schedule import learning_rate, position

  tc = _tc(
    stages=(
      StageConfig('a', 4, random_data=True, peak_lr=1.0, warmup_steps=2, end_lr_ratio=0.1),
      StageConfig('b', 3, random_data=True, peak_lr=0.5),
    )
  )
  assert [tuple(position(tc, g)) for g in range(8)] == [
    (0, 0),
    (0, 1),
    (0, 2),
    (0, 3),
    (1, 0),
    (1, 1),
    (1, 2),
    (2, 0),
  ]
  with pytest.raises(ValueError, match=r'global step 8 is outside the schedule \[0, 7\]'):
    position(tc, 8)
  a, b = tc.stages
  assert [learning_rate(a, k) for k in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.55])
  assert learning_rate(b, 0) == pytest.approx(0.5)  # each stage restarts its own schedule
  with pytest.raises(TrainConfigError, match="stage 'z': steps must be > 0, got 0"):
    StageConfig('z', 0, random_data=True)
  with pytest.raises(TrainConfigError, match='batch_size 8 is not a multiple of the 3 hosts'):
    data_lib.make_stage_loader(_tc(), 0, shard_index=0, shard_count=3)


@pytest.mark.slow
def test_bf16_compute_with_remat_keeps_fp32_master_params(single, batch_np):
  """Mixed precision: bf16 compute (loss within 2e-2 relative of float32), fp32 params/moments."""
  _, _, ref_m, _ = single
  _, new, m, _ = _run(_tc(compute_dtype='bfloat16', remat='full'), shd.make_mesh(1, 1, 1), batch_np)
  np.testing.assert_allclose(m['loss'], ref_m['loss'], rtol=2e-2)
  assert np.isfinite(m['grad_norm'])
  dtypes = {x.dtype for x in jax.tree.leaves(new.params)}
  dtypes |= {x.dtype for x in jax.tree.leaves(new.opt_state[1].mu)}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_grad_accumulation_traces_the_micro_batch_once(monkeypatch, batch_np):
  """The scan body is the only trace of the forward/backward (its accumulator starts at zeros)."""
  traced = []
  inner = sp._grads_and_sums
  monkeypatch.setattr(sp, '_grads_and_sums', lambda *a: traced.append(1) or inner(*a))
  tc, mesh = _tc(grad_accum=4), shd.make_mesh(2, 1, 1)
  spec = st.state_spec(tc, mesh)
  abstract_batch = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
    for (k, v), s in zip(batch_np.items(), sp.batch_shardings(mesh).values())
  }
  sp._jit_train_step(spec, tc, mesh).lower(spec.abstract, abstract_batch, jnp.float32(LR))
  assert len(traced) == 1

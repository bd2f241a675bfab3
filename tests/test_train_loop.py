"""The training loop: stage transitions, mid-stage resume (bit-identical), restore onto another
mesh, NaN stop, init from an official checkpoint, export round trip."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import random_data_config as _tc  # the shared shapes: one compile
from flax import nnx
from poisoned import poison_batch

from flmjax.checkpoint.checkpointer import Checkpointer
from flmjax.config import ModelConfig
from flmjax.train import data as data_lib
from flmjax.train import observe
from flmjax.train.config import MeshConfig, StageConfig, TrainConfigError
from flmjax.train.loop import NonFiniteError, train
from flmjax.train.schedule import learning_rate

pytestmark = pytest.mark.slow  # trains the tiny model through whole schedules


def _data_file(tc, step):
  """This (only) process's data-iterator state as saved in checkpoint `step`, or None."""
  path = os.path.join(tc.run_dir, 'checkpoints', str(step), 'data', 'process_0-of-1.json')
  if not os.path.exists(os.path.dirname(path)):
    return None
  with open(path) as f:
    return json.load(f)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _unpadded(a, b):
  """a and b over their common extent; asserts that a's padding beyond b's shape is zeros (the
  vocab and depth MLP are padded for the mesh's tensor size: 512 and 86 at tensor=2)."""
  for axis, n in enumerate(b.shape):
    assert not np.any(np.take(a, np.arange(n, a.shape[axis]), axis=axis))
  common = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))
  return a[common], b[common]


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  """An uninterrupted run: stage a (3 steps) then stage b (2 steps)."""
  tc = _tc(tmp_path_factory.mktemp('full'))
  return tc, train(tc, log=lambda *a: None)


def test_stage_transitions(full_run):
  tc, out = full_run
  assert out['global_step'] == 5
  hist = observe.history(tc.run_dir)
  assert [r['stage'] for r in hist] == ['a', 'a', 'a', 'b', 'b']
  want_lr = [learning_rate(tc.stages[0], k) for k in range(3)] + [
    learning_rate(tc.stages[1], k) for k in range(2)
  ]
  np.testing.assert_allclose([r['lr'] for r in hist], want_lr, rtol=1e-6)
  assert want_lr[3] == pytest.approx(1e-3)  # stage b restarts its own schedule at its peak
  assert [s['stage'] for s in out['stages']] == ['a', 'b']
  assert all(s['finished'] for s in out['stages'])
  for stream in ('total', 'text', 'semantic', 'acoustic'):
    assert os.path.getsize(os.path.join(tc.run_dir, f'loss_{stream}.png')) > 1000
  assert os.listdir(os.path.join(tc.run_dir, 'tensorboard'))
  meta = Checkpointer(os.path.join(tc.run_dir, 'checkpoints'), use_async=False).restore_meta()
  assert (meta['global_step'], meta['stage_name']) == (5, 'done')


def test_midstage_resume_is_bit_identical_and_restores_onto_another_mesh(full_run, tmp_path):
  tc_full, full = full_run
  tc = _tc(tmp_path / 'b')
  first = train(tc, stop_after=2, log=lambda *a: None)
  assert first['global_step'] == 2
  ckpt = Checkpointer(os.path.join(tc.run_dir, 'checkpoints'), use_async=False)
  meta = ckpt.restore_meta()
  ckpt.close()
  assert (meta['global_step'], meta['stage_name'], meta['step_in_stage']) == (2, 'a', 2)
  assert _data_file(tc, 2) == {'next_index': 16}  # two batches of 8 read (grain's handler)
  shutil.copytree(tc.run_dir, tmp_path / 'c')

  resumed = train(tc, log=lambda *a: None)
  assert resumed['global_step'] == 5
  for a, b in zip(_leaves(resumed['state']), _leaves(full['state'])):
    assert np.array_equal(a, b)  # params and optimizer state, bit for bit

  other = train(_tc(tmp_path / 'c', mesh=MeshConfig(1, 1, 1)), log=lambda *a: None)
  q = other['state'].params['backbone']['q']
  assert dict(q.sharding.mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  # Padded for tensor=1 now (vocab 384, not 512). Another mesh sums in another order: equal
  # within float32 noise after 3 more steps, params and Adam moments.
  assert other['state'].params['backbone']['lm_head'].shape == (64, 384)
  for a, b in zip(_leaves(full['state']), _leaves(other['state'])):
    np.testing.assert_allclose(*_unpadded(a, b), atol=5e-6, rtol=0)


def test_resume_at_stage_boundary_starts_next_stage_fresh(full_run, tmp_path):
  _, full = full_run
  tc = _tc(tmp_path / 'd', checkpoint_every=3)
  train(tc, stop_after=3, log=lambda *a: None)
  ckpt = Checkpointer(os.path.join(tc.run_dir, 'checkpoints'), use_async=False)
  meta = ckpt.restore_meta()
  ckpt.close()
  assert (meta['stage_name'], meta['step_in_stage']) == ('b', 0)
  assert _data_file(tc, 3) is None  # stage a's iterator is not carried into b
  resumed = train(tc, log=lambda *a: None)
  for a, b in zip(_leaves(resumed['state']), _leaves(full['state'])):
    assert np.array_equal(a, b)


def test_stop_after_off_the_checkpoint_grid_loses_nothing(full_run, tmp_path):
  _, full = full_run
  tc = _tc(tmp_path / 'e', checkpoint_every=4)
  train(tc, stop_after=3, log=lambda *a: None)  # 3 is not a multiple of checkpoint_every
  ckpt = Checkpointer(os.path.join(tc.run_dir, 'checkpoints'), use_async=False)
  assert ckpt.latest_step() == 3
  ckpt.close()
  resumed = train(tc, log=lambda *a: None)
  for a, b in zip(_leaves(resumed['state']), _leaves(full['state'])):
    assert np.array_equal(a, b)


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
  """CI and `| tee` get plain progress lines, never carriage-return bars."""
  train(_tc(tmp_path, progress_bar=True), log=lambda *a: None)
  out = capsys.readouterr()
  lines = [line for line in out.out.splitlines() if line.startswith('step ')]
  assert [line.split(':')[0] for line in lines] == [
    'step 1/5 (a)',
    'step 2/5 (a)',
    'step 3/5 (a)',
    'step 4/5 (b)',
    'step 5/5 (b)',
  ]
  assert 'loss ' in lines[-1] and 'steps/s' in lines[-1]
  assert '\r' not in out.out + out.err


def test_a_stage_with_its_own_window_and_batch_trains_and_resumes(full_run, tmp_path):
  """Stage a in 6-frame windows of 16 rows, stage b in the run's 12 x 8: both shapes train,
  frames/s counts each stage's own frames, and a mid-stage resume of stage b is bit-identical."""
  stages = tuple(
    dataclasses.replace(s, window=6, batch_size=16) if s.name == 'a' else s
    for s in full_run[0].stages
  )
  tc = _tc(tmp_path / 'full', stages=stages)
  full = train(tc, log=lambda *a: None)
  assert full['global_step'] == 5
  assert [s['stage'] for s in full['stages']] == ['a', 'b']
  part = _tc(tmp_path / 'part', stages=stages)
  train(part, stop_after=4, log=lambda *a: None)  # saves mid-stage b (checkpoint_every=2)
  resumed = train(part, log=lambda *a: None)
  for a, b in zip(_leaves(resumed['state']), _leaves(full['state'])):
    assert np.array_equal(a, b)
  bad = _tc(tmp_path / 'bad', stages=(dataclasses.replace(stages[0], batch_size=12), stages[1]))
  with pytest.raises(TrainConfigError, match=r'micro-batches of 6 rows, which must be'):
    train(bad.replace(grad_accum=2), log=lambda *a: None)


def test_resume_refuses_a_changed_schedule(tmp_path):
  tc = _tc(tmp_path / 'f')
  train(tc, stop_after=2, log=lambda *a: None)
  stages = (StageConfig('a', 1, random_data=True), StageConfig('b', 4, random_data=True))
  with pytest.raises(
    TrainConfigError,
    match=r"saved at stage 'a' step 2, but this config puts "
    r"it at stage 'b' step 1: the schedule changed",
  ):
    train(tc.replace(stages=stages), log=lambda *a: None)


def test_batch_must_split_over_the_mesh(tmp_path):
  with pytest.raises(
    TrainConfigError,
    match=r'micro-batches of 6 rows, which must be a whole '
    r'multiple of .* = 4',
  ):
    train(_tc(tmp_path, batch_size=12, grad_accum=2), log=lambda *a: None)


def test_nan_stops_the_run_and_writes_no_checkpoint(tmp_path, monkeypatch):
  poison_batch(monkeypatch, at=3)
  tc = _tc(tmp_path)
  with pytest.raises(NonFiniteError, match=r"at step 3 \(stage 'a', step 3 of the stage\)"):
    train(tc, log=lambda *a: None)
  ckpt = Checkpointer(os.path.join(tc.run_dir, 'checkpoints'), use_async=False)
  assert ckpt.all_steps()[-1] == 2 and 3 not in ckpt.all_steps()
  ckpt.close()


def test_init_from_official_checkpoint(tmp_path, tiny_dir, tiny_model):
  out = train(_tc(tmp_path / 'ok', init_from=str(tiny_dir)), stop_after=0, log=lambda *a: None)
  want = nnx.to_pure_dict(nnx.state(tiny_model))
  for a, b in zip(_leaves(out['state'].params), _leaves(want)):
    assert np.array_equal(*_unpadded(a, b))  # read into the tensor=2 padding
  other = ModelConfig.tiny(hidden_size=32, head_dim=8)
  with pytest.raises(
    TrainConfigError,
    match=r'differs from the training config in '
    r"\['head_dim', 'hidden_size'\]",
  ):
    train(_tc(tmp_path / 'bad', model=other, init_from=str(tiny_dir)), stop_after=0)


def test_export_round_trip(full_run, tmp_path, capsys):
  from flmjax import cli
  from flmjax.checkpoint import load_official

  tc, full = full_run
  out_dir = str(tmp_path / 'official')
  assert cli.main(['export', tc.run_dir, out_dir, '--dtype', 'float32']) == 0
  exported = load_official(out_dir, dtype='float32')
  trained = nnx.merge(full['spec'].graphdef, jax.device_get(full['state'].params))
  batch = next(
    data_lib.RandomGridIterator(
      tc.model, window=12, batch_size=2, seed=7, loss_weights=data_lib._loss_weights(tc.stages[0])
    )
  )
  tok = batch['tokens']
  args = (
    tok[:, 0, :-1],
    tok[:, 1:9, :-1].transpose(0, 2, 1),
    tok[:, 9:, :-1].transpose(0, 2, 1),
    tok[:, 1:8, 1:].transpose(0, 2, 1),
  )
  a, b = exported(*args), trained(*args)
  # float32 export of float32 params: the same numbers, so the same logits (atol 1e-6).
  np.testing.assert_allclose(np.asarray(a.text_logits), np.asarray(b.text_logits), atol=1e-6)
  np.testing.assert_allclose(np.asarray(a.depth_logits), np.asarray(b.depth_logits), atol=1e-6)
  assert cli.main(['export', str(tmp_path / 'nothing'), out_dir]) == 1
  assert 'no such checkpoint directory' in capsys.readouterr().err
  assert cli.main(['export', tc.run_dir, out_dir]) == 1  # exists; no --overwrite
  assert 'exists; pass --overwrite' in capsys.readouterr().err


def test_resume_with_another_model_config_is_refused(full_run, tmp_path):
  tc, _ = full_run
  shutil.copytree(os.path.join(tc.run_dir, 'checkpoints'), tmp_path / 'checkpoints')
  other = _tc(tmp_path, model=ModelConfig.tiny(num_layers=3))
  with pytest.raises(TrainConfigError, match=r'another model config \(num_layers=2\)'):
    train(other, log=lambda *a: None)


def test_grain_pipeline_resume_is_bit_identical(tmp_path_factory):
  """The same with the real data path: synthetic corpus -> prepare -> grain loaders per stage."""
  from flmjax.data.corpus import ensure_synthetic_corpus
  from flmjax.data.grid import LossWeights
  from flmjax.data.pipeline import SourceSpec

  corpus = ensure_synthetic_corpus(
    str(tmp_path_factory.mktemp('corpus')), num_tts_asr=16, num_duplex=16, num_heldout=4
  )
  stages = (
    StageConfig(
      'asr_tts',
      3,
      sources=(
        SourceSpec(corpus['tts_asr'], layout='lead', offset_frames=2),
        SourceSpec(corpus['tts_asr'], layout='trail', speech_stream='listen'),
      ),
      loss_weights=LossWeights(acoustic=0.2),
      peak_lr=3e-3,
    ),
    StageConfig(
      'duplex', 2, sources=(SourceSpec(corpus['duplex'], offset_frames=2),), peak_lr=1e-3
    ),
  )
  make = lambda d: _tc(tmp_path_factory.mktemp(d), stages=stages)
  full = train(make('grain_full'), log=lambda *a: None)
  tc = make('grain_resumed')
  train(tc, stop_after=2, log=lambda *a: None)
  resumed = train(tc, log=lambda *a: None)
  for a, b in zip(_leaves(resumed['state']), _leaves(full['state'])):
    assert np.array_equal(a, b)
  assert [r['stage'] for r in observe.history(tc.run_dir)] == ['asr_tts'] * 3 + ['duplex'] * 2
  # the loader's monologue counts are logged per step, equal to what the stage's loader yields
  hist = observe.history(tc.run_dir)
  for stage, steps in ((0, range(3)), (1, range(3, 5))):
    loader = data_lib.make_stage_loader(tc, stage)
    for step in steps:
      batch = next(loader)
      for key in ('pushed_frames', 'cut_tokens', 'extended_frames'):
        assert hist[step][key] == float(batch[key].sum()), (step, key)
  assert sum(r['extended_frames'] + r['pushed_frames'] for r in hist) > 0
  assert full['stages'][0]['data']['extended_frames'] == sum(r['extended_frames'] for r in hist[:3])

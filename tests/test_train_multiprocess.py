"""Two processes x 4 CPU devices (gloo collectives, a coordinator on a free localhost port) train
as one 8-device job: `flmjax train` unchanged in each process, the data axis across the two
(dcn_data=2, processes as slices), fsdp=4 inside each.

- the losses equal the single-process 8-device run fed the same global batches;
- SIGKILL both mid-run, restart, SIGTERM both (a preemption: they save where they stop), restart:
  the final params are bit-identical to an uninterrupted two-process run;
- the two-process checkpoints restore in one process: at the end of the run, and by export;
  mid-stage the resume is refused with ProcessCountError.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from flmjax.checkpoint.checkpointer import Checkpointer, ProcessCountError, abstract_on_cpu
from flmjax.config import ModelConfig
from flmjax.train import data as data_lib
from flmjax.train import observe
from flmjax.train.config import MeshConfig, load_config_file
from flmjax.train.loop import train
from flmjax.train.state import graphdef_and_abstract

pytestmark = pytest.mark.slow  # subprocess training jobs

CONFIG = """
from flmjax.config import ModelConfig
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import LoraConfig, MeshConfig, OptimConfig, StageConfig, TrainConfig

def get_config(run_dir):
  stages = (StageConfig('a', 4, sources=(SourceSpec({duplex!r}, offset_frames=2),), peak_lr=3e-3,
                        warmup_steps=1),
            StageConfig('b', 3, random_data=True, peak_lr=1e-3))
  return TrainConfig(model=ModelConfig.tiny(), stages=stages, run_dir=run_dir, window=12,
                     batch_size=8, compute_dtype='float32', optim=OptimConfig(eps=1e-3),
                     mesh=MeshConfig(data=1, fsdp=4, dcn_data=2), checkpoint_every=2,
                     keep_checkpoints=2, log_every=1, progress_bar=False, lora={lora})
"""
# LoRA on an int8 base made from --init_from (the golden tiny model): adapters train, the base is
# rebuilt in each process and fingerprinted.
LORA = "LoraConfig(4, 8.0, targets=('attn', 'mlp', 'depth'), base_dtype='int8')"
TOTAL = 7
TIMEOUT = 900  # seconds per launch: one took up to 6 min on a 2-core box at load average 25


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Job:
  """`flmjax train` as processes 0 and 1 of one job, each with 4 CPU devices."""

  def __init__(self, config, run_dir, logs, name, extra=()):
    env = {
      **os.environ,
      'PYTHONUNBUFFERED': '1',
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
    }
    port = _free_port()
    self.logs = [logs / f'{name}_{i}.log' for i in range(2)]
    self.procs = [
      subprocess.Popen(
        [
          sys.executable,
          '-m',
          'flmjax',
          'train',
          '--config',
          str(config),
          '--run_dir',
          str(run_dir),
          '--noprogress',
          '--coordinator_address',
          f'127.0.0.1:{port}',
          '--num_processes',
          '2',
          '--process_id',
          str(i),
          *map(str, extra),
        ],
        env=env,
        stdout=open(log, 'w'),
        stderr=subprocess.STDOUT,
      )
      for i, log in enumerate(self.logs)
    ]

  def output(self, i=0) -> str:
    return self.logs[i].read_text()

  def alive(self) -> bool:
    return all(p.poll() is None for p in self.procs)

  def signal(self, sig) -> None:
    for p in self.procs:
      p.send_signal(sig)

  def wait(self) -> list[int]:
    try:
      return [p.wait(timeout=TIMEOUT) for p in self.procs]
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
          p.wait()


def _steps(ckpt_dir) -> list[int]:
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if ckpt_dir.exists() else []


def _wait_for(what, job, timeout=TIMEOUT):
  deadline = time.time() + timeout
  while not what():
    assert job.alive(), job.output(0)[-3000:] + job.output(1)[-3000:]
    assert time.time() < deadline, f'timed out after {timeout} s'
    time.sleep(0.05)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  from flmjax.data.corpus import ensure_synthetic_corpus

  root = tmp_path_factory.mktemp('multiprocess')
  corpus = ensure_synthetic_corpus(
    str(root / 'corpus'), num_tts_asr=4, num_duplex=16, num_heldout=2
  )
  config = root / 'cfg.py'
  config.write_text(CONFIG.format(duplex=corpus['duplex'], lora=None))
  job = Job(config, root / 'reference', root, 'reference')
  assert job.wait() == [0, 0], job.output(0)[-3000:] + job.output(1)[-3000:]
  ckpt = Checkpointer(root / 'reference' / 'checkpoints', use_async=False)
  assert ckpt.latest_step() == TOTAL
  return root, config, ckpt


def _params(ckpt, step=None):
  """The params of a two-process checkpoint, read by this one process."""
  assert ckpt.restore_meta(step)['process_count'] == 2
  _, state = graphdef_and_abstract(ModelConfig.tiny(param_dtype='float32', dtype='float32'))
  return ckpt.restore_params(abstract_on_cpu(nnx.to_pure_dict(state)), step)


MAKE_STAGE_LOADER = data_lib.make_stage_loader


class BothShards(grain.DatasetIterator):
  """One process reading both processes' shards: the global batch of the two-process job."""

  def __init__(self, tc, stage):
    super().__init__()
    self.parts = [MAKE_STAGE_LOADER(tc, stage, shard_index=i, shard_count=2) for i in range(2)]

  def __next__(self):
    batches = [next(p) for p in self.parts]
    return {k: np.concatenate([b[k] for b in batches]) for k in ('tokens', 'weights')}

  def get_state(self):
    return {'shards': [p.get_state() for p in self.parts]}

  def set_state(self, state):
    for p, s in zip(self.parts, state['shards']):
      p.set_state(s)


def test_losses_equal_the_single_process_run_on_the_same_global_batch(setup, tmp_path, monkeypatch):
  root, config, _ = setup
  monkeypatch.setattr(data_lib, 'make_stage_loader', lambda tc, stage, **k: BothShards(tc, stage))
  tc = load_config_file(str(config), str(tmp_path / 'one')).replace(mesh=MeshConfig(2, 4, 1))
  out = train(tc, log=lambda *a: None)
  two = observe.history(str(root / 'reference'))
  one = observe.history(tc.run_dir)
  assert [r['step'] for r in two] == list(range(1, TOTAL + 1))
  # The same program on the same (2, 4) device grid; only where the collectives run differs.
  np.testing.assert_allclose([r['loss'] for r in one], [r['loss'] for r in two], rtol=1e-6)
  np.testing.assert_allclose(
    [r['grad_norm'] for r in one], [r['grad_norm'] for r in two], rtol=1e-5
  )
  want = jax.device_get(out['state'].params)
  got = _params(setup[2])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_sigkill_then_sigterm_then_resume_is_bit_identical(setup, tmp_path):
  root, config, reference = setup
  run_dir = tmp_path / 'interrupted'
  ckpt_dir = run_dir / 'checkpoints'

  job = Job(config, run_dir, tmp_path, 'killed')
  _wait_for(lambda: _steps(ckpt_dir), job)
  assert _steps(ckpt_dir) == [2]  # mid-stage a: kept for the one-process check below
  shutil.copytree(ckpt_dir / '2', tmp_path / 'kept' / 'checkpoints' / '2')
  job.signal(signal.SIGKILL)
  job.wait()
  killed_at = max(_steps(ckpt_dir))
  assert 2 <= killed_at < TOTAL

  job = Job(config, run_dir, tmp_path, 'preempted')
  logged = lambda: len(observe.history(str(run_dir)))
  _wait_for(lambda: f'at step {killed_at}' in job.output(0) and logged() > killed_at, job)
  job.signal(signal.SIGTERM)
  assert job.wait() == [143, 143], job.output(0)[-3000:] + job.output(1)[-3000:]
  saved = max(_steps(ckpt_dir))
  assert killed_at < saved < TOTAL
  assert f'preempted; step {saved} is saved' in job.output(0)

  job = Job(config, run_dir, tmp_path, 'finished')
  assert job.wait() == [0, 0], job.output(0)[-3000:] + job.output(1)[-3000:]
  assert f'resumed from {ckpt_dir} at step {saved}' in job.output(0)
  assert 'resumed' not in job.output(1)  # logs come from process 0 only
  final = Checkpointer(ckpt_dir, use_async=False)
  assert final.latest_step() == TOTAL
  for a, b in zip(jax.tree.leaves(_params(final)), jax.tree.leaves(_params(reference))):
    assert np.array_equal(np.asarray(a), np.asarray(b))

  # One process: mid-stage the data states of two shards cannot be resumed...
  tc = load_config_file(str(config), str(tmp_path / 'kept')).replace(mesh=MeshConfig(2, 4, 1))
  with pytest.raises(
    ProcessCountError,
    match=r'step 2 was written by 2 processes and this run '
    r'has 1: mid-stage',
  ):
    train(tc, log=lambda *a: None)
  # ...while the finished run restores (params onto the one-process mesh) and exports.
  done = train(tc.replace(run_dir=str(run_dir)), log=lambda *a: None)
  assert done['global_step'] == TOTAL
  for a, b in zip(
    jax.tree.leaves(jax.device_get(done['state'].params)), jax.tree.leaves(_params(reference))
  ):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  from flmjax import cli
  from flmjax.checkpoint import load_official

  assert cli.main(['export', str(run_dir), str(tmp_path / 'exported'), '--dtype', 'float32']) == 0
  exported = nnx.to_pure_dict(nnx.state(load_official(str(tmp_path / 'exported'), dtype='float32')))
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(_params(reference))):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_lora_on_an_int8_base_equals_the_single_process_run(setup, tmp_path, monkeypatch, tiny_dir):
  """Two processes train LoRA adapters over an int8 base read from --init_from: their losses,
  adapters and base fingerprint equal the single-process run's on the same global batches."""
  _, full_config, _ = setup
  config = tmp_path / 'lora.py'  # the same corpus and schedule
  config.write_text(full_config.read_text().replace('lora=None)', f'lora={LORA})'))
  job = Job(config, tmp_path / 'two', tmp_path, 'lora', extra=('--init_from', tiny_dir))
  assert job.wait() == [0, 0], job.output(0)[-3000:] + job.output(1)[-3000:]
  monkeypatch.setattr(data_lib, 'make_stage_loader', lambda tc, stage, **k: BothShards(tc, stage))
  tc = load_config_file(str(config), str(tmp_path / 'one')).replace(
    mesh=MeshConfig(2, 4, 1), init_from=str(tiny_dir)
  )
  out = train(tc, log=lambda *a: None)
  two, one = observe.history(str(tmp_path / 'two')), observe.history(tc.run_dir)
  assert [r['step'] for r in two] == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([r['loss'] for r in one], [r['loss'] for r in two], rtol=1e-6)
  ckpts = [Checkpointer(tmp_path / d / 'checkpoints', use_async=False) for d in ('two', 'one')]
  fingerprints = [c.restore_meta()['base_fingerprint'] for c in ckpts]
  assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 64
  want = jax.device_get(out['state'].params)  # the adapters only
  got = ckpts[0].restore_params(abstract_on_cpu(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)

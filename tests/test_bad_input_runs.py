"""Bad-input probes of `flmjax train`'s run directory, resume, --init-from and multi-process
settings (issue 22): one stderr line, exit status 1, checked before anything is created; a job
that cannot form ends within its bound. No bucket is contacted: gs:// is simulated."""

import os
import socket
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import pytest
from flax import nnx
from probe import error_line, run
from test_bad_input_train import GOOD, config_file, edit


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_resume_with_a_shorter_schedule(capsys, tmp_path, tiny_model):
  """A run saved at step 2 of 2, resumed by a config of 1 step: the same message as a schedule
  that moved the step to another stage."""
  from flmjax.checkpoint.checkpointer import Checkpointer
  from flmjax.train.config import load_config_file
  from flmjax.train.loop import _meta
  from flmjax.train.state import TrainState

  run_dir = tmp_path / 'run'
  tc = load_config_file(config_file(tmp_path, GOOD), str(run_dir))
  ckpt = Checkpointer(str(run_dir / 'checkpoints'), use_async=False)
  ckpt.save(
    2,
    TrainState(nnx.to_pure_dict(nnx.state(tiny_model)), {'count': jnp.zeros((), jnp.int32)}),
    _meta(tc, 2, 1, None),
    force=True,
  )
  ckpt.close()
  shorter = config_file(tmp_path, edit(a=('steps=2', 'steps=1')))
  line = error_line(capsys, 'train', '--config', shorter, '--run-dir', run_dir)
  assert (
    "step 2 was saved at stage 'done' step 0, but this config has only 1 steps: the "
    'schedule changed; use a new --run-dir' in line
  )


def test_init_from_is_checked_before_anything_is_created(capsys, tmp_path, tiny_dir):
  path = config_file(tmp_path, GOOD)
  line = error_line(
    capsys,
    'train',
    '--config',
    path,
    '--run-dir',
    tmp_path / 'run',
    '--init-from',
    tmp_path / 'nope',
  )
  assert f'--init-from {tmp_path}/nope: no such checkpoint directory' in line
  other = config_file(
    tmp_path, edit(a=('ModelConfig.tiny()', 'ModelConfig.tiny(hidden_size=32, head_dim=8)'))
  )
  line = error_line(
    capsys, 'train', '--config', other, '--run-dir', tmp_path / 'run', '--init-from', tiny_dir
  )
  assert "its config.json differs from the training config in ['head_dim', 'hidden_size']" in line
  (tmp_path / 'weights').mkdir()
  (tmp_path / 'weights' / 'config.json').write_text((tiny_dir / 'config.json').read_text())
  line = error_line(
    capsys,
    'train',
    '--config',
    path,
    '--run-dir',
    tmp_path / 'run',
    '--init-from',
    tmp_path / 'weights',
  )
  assert 'neither model.safetensors.index.json nor model.safetensors found' in line
  assert not (tmp_path / 'run').exists()  # no empty run/checkpoints/ left behind


def test_run_dir_that_cannot_be_created(capsys, tmp_path):
  path = config_file(tmp_path, GOOD)
  (tmp_path / 'afile').write_text('keep me')
  line = error_line(capsys, 'train', '--config', path, '--run-dir', tmp_path / 'afile' / 'run')
  assert (
    f'run directory {tmp_path}/afile/run cannot be created: {tmp_path}/afile is a file, '
    'not a directory; pass another --run-dir' in line
  )
  assert (tmp_path / 'afile').read_text() == 'keep me'
  if os.geteuid() == 0:  # root writes through file modes: take a path the kernel refuses
    locked = '/sys/flmjax_probe_run'
  else:
    (tmp_path / 'locked').mkdir(mode=0o500)
    locked = str(tmp_path / 'locked' / 'run')
  line = error_line(capsys, 'train', '--config', path, '--run-dir', locked)
  assert f'run directory {locked} cannot be created or written: ' in line and (
    'not permitted' in line or 'Permission denied' in line or 'Read-only' in line
  ), line


def test_gs_run_dir_without_gcsfs(capsys, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'gcsfs', None)  # as on a fresh install without [gcs]
  line = error_line(
    capsys, 'train', '--config', config_file(tmp_path, GOOD), '--run-dir', 'gs://bucket/run'
  )
  assert (
    'gs://bucket/run: gs:// paths need the gcsfs package, which is not installed: pip '
    'install "flmjax[gcs]" (or pip install gcsfs)' in line
  )


def test_gs_run_dir_unreachable_in_bounded_time(capsys, tmp_path, monkeypatch):
  """No network or no credentials: one line within the bound, never a hang. The bucket's answer
  is simulated (nothing here may contact Google Cloud Storage)."""
  from flmjax.checkpoint import storage

  monkeypatch.setitem(sys.modules, 'gcsfs', types.ModuleType('gcsfs'))
  monkeypatch.setattr(storage, 'REMOTE_TIMEOUT_S', 0.3)
  monkeypatch.setattr(storage, '_exists', lambda path: time.sleep(30))  # a network that hangs
  line = error_line(
    capsys, 'train', '--config', config_file(tmp_path, GOOD), '--run-dir', 'gs://bucket/run'
  )
  assert (
    'gs://bucket/run: no answer from gs:// within 0.3 s; check the network and the '
    'credentials' in line
  )

  class DefaultCredentialsError(Exception):
    pass

  def no_credentials(path):
    raise DefaultCredentialsError('Your default credentials were not found.\nTo set up ...')

  monkeypatch.setattr(storage, '_exists', no_credentials)
  line = error_line(
    capsys, 'train', '--config', config_file(tmp_path, GOOD), '--run-dir', 'gs://bucket/run'
  )
  assert (
    'gs://bucket/run: cannot reach it: DefaultCredentialsError: Your default credentials '
    'were not found. (check the credentials and the network)' in line
  )
  assert not os.path.exists('gs:')


# ---- multi-process settings ------------------------------------------------------------------


@pytest.fixture
def no_job_env(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  return monkeypatch


@pytest.mark.parametrize(
  'flags, message',
  [
    (
      ('--coordinator-address', 'nohost', '--num-processes', '2', '--process-id', '1'),
      "coordinator address 'nohost' must be HOST:PORT (e.g. 10.0.0.2:1234), the address of "
      'process 0',
    ),
    (
      ('--coordinator-address', 'host:99999', '--num-processes', '2', '--process-id', '0'),
      "coordinator address 'host:99999' must be HOST:PORT",
    ),
    (
      (
        '--coordinator-address',
        'no-such-host.invalid:1234',
        '--num-processes',
        '2',
        '--process-id',
        '1',
      ),
      "cannot resolve host 'no-such-host.invalid'",
    ),
    (
      ('--multihost',),
      '--multihost discovers the job on a Cloud TPU VM, and this machine has no '
      'TPU chips; elsewhere give --coordinator-address HOST:PORT',
    ),
    (
      (
        '--coordinator-address',
        '127.0.0.1:1',
        '--num-processes',
        '2',
        '--process-id',
        '1',
        '--coordinator-timeout-s',
        '0',
      ),
      '--coordinator-timeout-s 0.0 must be a number > 0',
    ),
  ],
  ids=['nohost', 'bad_port', 'unresolvable', 'multihost_off_tpu', 'timeout_zero'],
)
def test_distributed_settings(capsys, tmp_path, no_job_env, flags, message):
  line = error_line(
    capsys, 'train', '--config', config_file(tmp_path, GOOD), '--run-dir', tmp_path / 'run', *flags
  )
  assert message in line
  assert not (tmp_path / 'run').exists()


def test_no_coordinator_says_what_it_waits_for_and_gives_up(capsys, tmp_path, no_job_env):
  """Process 1 of 2 with nobody at the coordinator's address, set by the environment as a job
  launcher would: it says which coordinator it waits for, as which process, and ends at the
  bound with one line."""
  port = _free_port()
  no_job_env.setenv('JAX_COORDINATOR_ADDRESS', f'127.0.0.1:{port}')
  no_job_env.setenv('JAX_NUM_PROCESSES', '2')
  no_job_env.setenv('JAX_PROCESS_ID', '1')
  rc, out, err = run(
    capsys,
    'train',
    '--config',
    config_file(tmp_path, GOOD),
    '--run-dir',
    tmp_path / 'run',
    '--coordinator-timeout-s',
    '1',
  )
  assert (
    f'distributed: process 1 of 2, coordinator 127.0.0.1:{port}: waiting up to 1 s for the '
    'coordinator (process 0) (--coordinator-timeout-s)' in out
  )
  lines = err.strip().splitlines()
  assert rc == 1 and len(lines) == 1, err
  assert lines[0].startswith(
    'flmjax train: error: distributed: process 1 of 2, coordinator '
    f'127.0.0.1:{port}: no coordinator answered within 1 s; start '
    'process 0 with the same address'
  )
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_process_0_without_peers_ends_at_the_bound(tmp_path):
  """Process 0 of 2 and nobody else: jax's client would abort the process (SIGABRT and a C++
  stack trace) at its own deadline; the watchdog ends it first with one line and status 1."""
  config = config_file(tmp_path, GOOD)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'XLA_FLAGS'):
    env.pop(var, None)
  port = _free_port()
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'flmjax',
      'train',
      '--config',
      config,
      '--run-dir',
      str(tmp_path / 'run'),
      '--coordinator-address',
      f'127.0.0.1:{port}',
      '--num-processes',
      '2',
      '--process-id',
      '0',
      '--coordinator-timeout-s',
      '3',
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  errors = [l for l in proc.stderr.splitlines() if 'error' in l.lower()]
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert errors == [
    f'flmjax train: error: distributed: process 0 of 2, coordinator '
    f'127.0.0.1:{port}: the job did not form within 3 s (not every process '
    'joined); start all of them with the same settings, or raise '
    '--coordinator-timeout-s'
  ], proc.stderr[-2000:]
  assert 'Check failure' not in proc.stderr and 'Traceback' not in proc.stderr
  assert 'waiting up to 3 s for the other processes' in proc.stdout
  assert not (tmp_path / 'run').exists()


# ---- issue 25 §4: a checkpoint of another kind, a bucket's logs, the coordinator's wait ------


def _run_dir(tmp_path, tiny_model, lora=None):
  """A training run's checkpoint at step 1 of GOOD's schedule (a LoRA run's meta with `lora`)."""
  from flmjax.checkpoint.checkpointer import Checkpointer
  from flmjax.train.config import load_config_file
  from flmjax.train.loop import _meta
  from flmjax.train.state import TrainState

  name = 'lora_run' if lora else 'run'
  tc = load_config_file(config_file(tmp_path, GOOD), str(tmp_path / name)).replace(lora=lora)
  ckpt = Checkpointer(str(tmp_path / name / 'checkpoints'), use_async=False)
  ckpt.save(
    1,
    TrainState(nnx.to_pure_dict(nnx.state(tiny_model)), {'count': jnp.zeros((), jnp.int32)}),
    _meta(tc, 1, 1, 'f' * 64 if lora else None),
    force=True,
  )
  ckpt.close()
  return tmp_path / name


def test_init_from_another_kind_of_checkpoint(capsys, tmp_path, tiny_model, golden_dir):
  from flmjax.model.lora import LoraConfig

  lora_run = _run_dir(tmp_path, tiny_model, LoraConfig(4, 8.0, targets=('attn',)))
  full_run = _run_dir(tmp_path, tiny_model)
  path = config_file(tmp_path, GOOD)
  init = lambda src: error_line(
    capsys, 'train', '--config', path, '--run-dir', tmp_path / 'new', '--init-from', src
  )
  assert (
    f'--init-from {lora_run} is a LoRA training run, not an official checkpoint; merge it '
    f'into its base first: `flmjax export --merge {lora_run} OUT_DIR`, then give OUT_DIR'
  ) in init(lora_run)
  inner = lora_run / 'checkpoints'
  assert f'--init-from {inner} is a LoRA training run' in init(inner)
  assert (
    f'--init-from {full_run} is a training run, not an official checkpoint; export it first: '
    f'`flmjax export {full_run} OUT_DIR`, then give OUT_DIR'
  ) in init(full_run)
  mimi = golden_dir / 'mimi_small'
  for given in (mimi, mimi / 'mimi.safetensors'):
    assert (
      f'--init-from {given} is a Mimi codec checkpoint (the audio tokenizer), not an '
      'FLM-Audio model; here give the model (config.json + model.safetensors)'
    ) in init(given)
  assert not (tmp_path / 'new').exists()


def test_gs_client_logs_stay_off_stderr(capsys, tmp_path, monkeypatch, tiny_model):
  """gcsfs without a network logs each failed request with its traceback, and a credential
  warning, on its logger (which has no handler: logging's last resort prints them). Only the
  one line is shown, with the client's error as its cause. Simulated: no bucket is contacted."""
  import logging

  from flmjax.checkpoint import storage

  monkeypatch.setitem(sys.modules, 'gcsfs', types.ModuleType('gcsfs'))

  class ClientConnectorDNSError(OSError):
    pass

  def offline(path):
    log = logging.getLogger('gcsfs')
    log.warning('Could not determine bucket type: Your default credentials were not found.')
    try:
      raise ClientConnectorDNSError('Cannot connect to host storage.googleapis.com:443')
    except OSError as e:
      log.exception('_request out of retries on exception: %s', e)
      logging.getLogger('google.auth._default').warning('No project ID could be determined.')
      raise

  monkeypatch.setattr(storage, '_exists', offline)
  for argv in (
    ('train', '--config', config_file(tmp_path, GOOD), '--run-dir', 'gs://bucket/run'),
    ('export', _run_dir(tmp_path, tiny_model), 'gs://bucket/out'),
  ):
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and len(err.splitlines()) == 1, err  # no traceback, no warnings
    assert (
      'cannot reach it: ClientConnectorDNSError: Cannot connect to host '
      'storage.googleapis.com:443 (check the credentials and the network)' in err
    ), err
  assert logging.getLogger('gcsfs').handlers == [] and logging.getLogger('gcsfs').propagate


def test_coordinator_wait_says_its_progress(no_job_env):
  """Process 1 of 2 with no coordinator: a line every 30 s of the (injected) clock, naming who
  is awaited, where and for how long, then the error at the bound."""
  from flmjax.distributed import DistributedError, initialize_distributed

  port = _free_port()
  now, lines = [0.0], []

  def sleep(s):
    now[0] += s

  with pytest.raises(DistributedError, match='no coordinator answered within 100 s'):
    initialize_distributed(
      f'127.0.0.1:{port}',
      2,
      1,
      timeout_s=100,
      log=lines.append,
      clock=lambda: now[0],
      sleep=sleep,
    )
  where = f'distributed: process 1 of 2, coordinator 127.0.0.1:{port}'
  assert lines == [
    f'{where}: waiting up to 100 s for the coordinator (process 0) (--coordinator-timeout-s)',
    f'{where}: waiting for the coordinator (process 0): 30 s so far (up to 100 s)',
    f'{where}: waiting for the coordinator (process 0): 60 s so far (up to 100 s)',
    f'{where}: waiting for the coordinator (process 0): 90 s so far (up to 100 s)',
  ]


def test_progress_while_jax_blocks():
  """The thread beside jax.distributed.initialize: one line per period until the job forms."""
  from flmjax.distributed import Progress

  now, lines = [0.0], []

  class Joined:  # the job forms after three periods
    def __init__(self):
      self.waits = 0

    def wait(self, seconds):
      self.waits += 1
      now[0] += seconds
      return self.waits > 3

  Progress(
    'waiting for the other 3 process(es) to join', 0.0, 300, 30, lines.append, lambda: now[0]
  ).report_until(Joined())
  assert lines == [
    f'waiting for the other 3 process(es) to join: {s} s so far (up to 300 s)' for s in (30, 60, 90)
  ]

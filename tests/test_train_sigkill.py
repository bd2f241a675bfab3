"""A run killed with SIGKILL resumes from its last checkpoint, and a run sent SIGTERM (a
preemption notice) saves where it is and stops; both end bit-identical to a run that was never
interrupted (CPU, fixed seeds)."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flmjax.checkpoint.checkpointer import Checkpointer, abstract_on_cpu
from flmjax.train.config import load_config_file
from flmjax.train.loop import train

pytestmark = pytest.mark.slow  # subprocess training jobs, killed and resumed

CONFIG = """
from flmjax.config import ModelConfig
from flmjax.train.config import LoraConfig, MeshConfig, OptimConfig, StageConfig, TrainConfig

EVERY = {every}
LORA = {lora}


def get_config(run_dir):
  stages = (StageConfig('a', 8, random_data=True, peak_lr=3e-3, warmup_steps=2),
            StageConfig('b', 6, random_data=True, peak_lr=1e-3))
  return TrainConfig(model=ModelConfig.tiny(), stages=stages, run_dir=run_dir, window=12,
                     batch_size=8, compute_dtype='float32', optim=OptimConfig(eps=1e-3),
                     mesh=MeshConfig(2, 2, 2), checkpoint_every=EVERY, keep_checkpoints=2,
                     log_every=1, progress_bar=False, lora=LORA)
"""
# LoRA on an int8 base: the checkpoints hold the adapters and their moments only.
LORA = "LoraConfig(4, 8.0, targets=('attn', 'mlp', 'depth'), base_dtype='int8')"
KINDS = {'full': 'None', 'lora': LORA}


def _train_cmd(config, run_dir):
  return [
    sys.executable,
    '-m',
    'flmjax',
    'train',
    '--config',
    str(config),
    '--run_dir',
    str(run_dir),
    '--noprogress',
  ]


def _complete_steps(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if re.fullmatch(r'\d+', d))


def _env(tmp_path):
  # A persistent compilation cache is set, as a user might: on the 8 CPU devices `flmjax train`
  # turns it off (flmjax.platforms.compile_fresh_on_cpu_mesh), else a resumed LoRA run deadlocks.
  return {
    **os.environ,
    'PYTHONUNBUFFERED': '1',
    'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
  }


def _reference(tmp_path_factory, kind):
  """Final params (LoRA: adapters) of the uninterrupted run, in this process."""
  config = tmp_path_factory.mktemp('reference') / 'cfg.py'
  config.write_text(CONFIG.format(every=3, lora=KINDS[kind]))
  out = train(load_config_file(str(config), str(config.parent / 'run')), log=lambda *a: None)
  return jax.device_get(out['state'].params)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  return _reference(tmp_path_factory, 'full')


def _final_params_equal(ckpt_dir, want):
  ckpt = Checkpointer(str(ckpt_dir), use_async=False)
  assert ckpt.latest_step() == 14
  got = ckpt.restore_params(abstract_on_cpu(want))
  ckpt.close()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_then_resume_is_bit_identical(tmp_path, reference):
  _sigkill_then_resume(tmp_path, reference, 'full')


@pytest.mark.slow
def test_lora_sigkill_then_resume_is_bit_identical(tmp_path, tmp_path_factory):
  """LoRA on an int8 base: adapters and their moments resume exactly; the base is rebuilt."""
  _sigkill_then_resume(tmp_path, _reference(tmp_path_factory, 'lora'), 'lora')


def _sigkill_then_resume(tmp_path, reference, kind):
  config = tmp_path / 'cfg.py'
  config.write_text(CONFIG.format(every=3, lora=KINDS[kind]))
  run_dir = tmp_path / 'killed'
  ckpt_dir = run_dir / 'checkpoints'
  env = _env(tmp_path)
  proc = subprocess.Popen(
    _train_cmd(config, run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  deadline = time.time() + 600  # generous: CI boxes are shared
  while not [s for s in _complete_steps(ckpt_dir) if s >= 3]:
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline, 'no checkpoint written within 600 s'
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_complete_steps(ckpt_dir))
  assert 3 <= killed_at < 14

  done = subprocess.run(
    _train_cmd(config, run_dir), env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert re.search(r'resumed from .* at step \d+', done.stdout + done.stderr)
  _final_params_equal(ckpt_dir, reference)


def _logged_steps(run_dir):
  path = os.path.join(run_dir, 'metrics.jsonl')
  return len(open(path).readlines()) if os.path.exists(path) else 0


def test_sigterm_saves_where_it_stops_then_resumes_bit_identical(tmp_path, reference):
  config = tmp_path / 'cfg.py'
  config.write_text(CONFIG.format(every=100, lora='None'))  # every save is the preemption's
  run_dir = tmp_path / 'preempted'
  env = _env(tmp_path)
  proc = subprocess.Popen(
    _train_cmd(config, run_dir),
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 600  # generous: CI boxes are shared
  while _logged_steps(run_dir) < 2:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, 'no step logged within 600 s'
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, out[-3000:]
  saved = _complete_steps(run_dir / 'checkpoints')
  assert len(saved) == 1 and 2 <= saved[0] < 14, saved
  assert f'preempted; step {saved[0]} is saved' in out
  assert _logged_steps(run_dir) == saved[0]  # it stopped at the step it saved

  lines = []  # resumed in this process: the reference's compiled step is reused
  train(load_config_file(str(config), str(run_dir)), log=lines.append)
  assert any(
    l.startswith(f'resumed from {run_dir / "checkpoints"} at step {saved[0]}') for l in lines
  )
  _final_params_equal(run_dir / 'checkpoints', reference)

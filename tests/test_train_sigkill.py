"""A run killed with SIGKILL resumes from its last checkpoint and ends bit-identical to a run
that was never interrupted (CPU, fixed seeds)."""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from flmjax.train.checkpointing import Checkpointer, abstract_on_cpu
from flmjax.train.config import load_config_file
from flmjax.train.loop import train

CONFIG = '''
from flmjax.config import ModelConfig
from flmjax.train.config import MeshConfig, OptimConfig, StageConfig, TrainConfig

def get_config(run_dir):
  stages = (StageConfig('a', 8, random_data=True, peak_lr=3e-3, warmup_steps=2),
            StageConfig('b', 6, random_data=True, peak_lr=1e-3))
  return TrainConfig(model=ModelConfig.tiny(), stages=stages, run_dir=run_dir, window=12,
                     batch_size=8, compute_dtype='float32', optim=OptimConfig(eps=1e-3),
                     mesh=MeshConfig(2, 2, 2), checkpoint_every=3, keep_checkpoints=2,
                     log_every=1, progress_bar=False)
'''


def _train_cmd(config, run_dir):
  return [sys.executable, '-m', 'flmjax', 'train', '--config', str(config), '--run_dir',
          str(run_dir), '--noprogress']


def _complete_steps(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if re.fullmatch(r'\d+', d))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  config = tmp_path / 'cfg.py'
  config.write_text(CONFIG)
  run_dir = tmp_path / 'killed'
  ckpt_dir = run_dir / 'checkpoints'
  # The resumed process reuses the killed one's compiled step from a persistent cache.
  env = {**os.environ, 'PYTHONUNBUFFERED': '1',
         'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  proc = subprocess.Popen(_train_cmd(config, run_dir), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while not [s for s in _complete_steps(ckpt_dir) if s >= 3]:
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline, 'no checkpoint written within 240 s'
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_complete_steps(ckpt_dir))
  assert 3 <= killed_at < 14

  done = subprocess.run(_train_cmd(config, run_dir), env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert re.search(r'resumed from .* at step \d+', done.stdout + done.stderr)

  reference = train(load_config_file(str(config), str(tmp_path / 'reference')),
                    log=lambda *a: None)
  want = jax.device_get(reference['state'].params)
  ckpt = Checkpointer(str(ckpt_dir), use_async=False)
  assert ckpt.latest_step() == 14
  got = ckpt.restore_params(abstract_on_cpu(want))
  ckpt.close()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.array_equal(np.asarray(a), np.asarray(b))

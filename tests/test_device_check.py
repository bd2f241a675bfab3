"""experiments/device_check.sh (the script for a lent GPU) parses, and every script it runs answers
--help. It has not run on a GPU yet: no device has been lent to this work (see RESULTS.md)."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'experiments' / 'device_check.sh'


def called_scripts() -> list[str]:
  return re.findall(r'"\$PY" (experiments/\w+\.py)', SCRIPT.read_text())


def test_device_check_parses_and_names_its_steps():
  subprocess.run(['bash', '-n', str(SCRIPT)], check=True)
  assert called_scripts() == [
    'experiments/gpu_kernel_check.py',
    'experiments/bench_depth_kernel.py',
    'experiments/bench_attention.py',
    'experiments/bench_decode.py',
    'experiments/bench_mimi.py',
    'experiments/roofline.py',
  ]
  limits = [int(n) for n in re.findall(r'^step \w+ (\d+) ', SCRIPT.read_text(), re.M)]
  assert len(limits) == 6 and sum(limits) <= 8 * 60  # the 8 minutes on one GPU


@pytest.mark.slow
@pytest.mark.parametrize('script', called_scripts())
def test_each_step_answers_help(script):
  text = SCRIPT.read_text()
  flags = set()
  for line in re.findall(rf'{re.escape(script)}(.*(?:\\\n.*)?)', text):
    flags |= set(re.findall(r'(--[\w-]+)', line))
  done = subprocess.run(
    [sys.executable, script, '--help'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin'},
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'usage:' in done.stdout
  for flag in flags:  # every flag the script passes exists
    assert flag in done.stdout, f'{script} has no {flag}'

"""The `flmjax` command line: dispatch, help, and errors that name the problem."""

import pytest

from flmjax import cli


def test_top_level_help_and_unknown_command(capsys):
  assert cli.main(['--help']) == 0
  out = capsys.readouterr().out
  assert all(name in out for name in ('main', 'data', 'train', 'export', 'chat'))
  assert cli.main(['bogus']) == 1
  assert "unknown command 'bogus'" in capsys.readouterr().err


def test_train_help_and_flag_errors(capsys, tmp_path):
  assert cli.main(['train', '--help']) == 0
  assert '--config' in capsys.readouterr().out
  assert cli.main(['train', '--bogus']) == 1
  assert 'unrecognized arguments: --bogus' in capsys.readouterr().err
  assert cli.main(['train']) == 1
  assert '--config is required' in capsys.readouterr().err
  assert cli.main(['train', '--config', str(tmp_path / 'nope.py')]) == 1
  assert 'nope.py not found' in capsys.readouterr().err


def test_old_flag_spellings_still_work(capsys, tmp_path):
  """Every flag is spelled with dashes; the earlier underscore spellings (absl's, for train) parse
  into the same option, so existing scripts keep working. Each call stops at a check that runs
  after parsing: only a parsed flag reaches it."""
  nope = str(tmp_path / 'nope.py')
  for argv in (
    [
      'train',
      '--config',
      nope,
      '--run_dir',
      str(tmp_path),
      '--noprogress',
      '--init_from',
      str(tmp_path),
      '--coordinator_address',
      'h:1',
      '--num_processes',
      '2',
      '--process_id',
      '0',
    ],
    ['train', '--config', nope, '--run-dir', str(tmp_path), '--no-progress', '--progress'],
    ['main', '--config', nope, '--run_dir', str(tmp_path)],
  ):
    assert cli.main(argv) == 1
    assert 'nope.py not found' in capsys.readouterr().err, argv
  for flag in ('--stop_after', '--stop-after'):  # the same option: its own check names it
    assert cli.main(['train', '--config', nope, flag, '0']) == 1
    assert '--stop-after 0 must be >= 1' in capsys.readouterr().err
  for flag in ('--grad_accum', '--grad-accum'):
    assert cli.main(['aot', '--topology', 'v5e:2x2', flag, 'x']) == 1
    assert "invalid int value: 'x'" in capsys.readouterr().err
  assert cli.main(['train', '--help']) == 0
  out = capsys.readouterr().out
  options = out.split('options:')[1].split('Several processes')[0]
  assert '--run-dir' in options and '--run_dir' not in options  # the old spellings stay hidden


# ---- a [tpu] install on a machine without a TPU (issue 25) ----------------------------------


def _machine(tmp_path, *files):
  """A fake root: device files, and PCI vendor files as 'path=content'."""
  for spec in files:
    path, _, content = spec.partition('=')
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(content)
  return str(tmp_path)


def _installed(*packages):
  return lambda name: object() if name in packages else None


def test_libtpu_without_tpu_chips_leaves_the_tpu_out(tmp_path):
  from flmjax.platforms import cpu_unless_accelerator as pick

  nic = 'sys/bus/pci/devices/0000:00:04.0/vendor=0x1ae0'  # a Google PCI device
  cases = [  # (files, installed packages, env before) -> (JAX_PLATFORMS, line shown)
    ((), ('libtpu',), {}, 'cpu', True),
    (('dev/vfio/0',), ('libtpu',), {}, 'cpu', True),  # vfio passing through something else
    (('dev/vfio/0', nic), ('libtpu',), {}, None, False),  # a v5p/v6e TPU VM
    (('dev/accel0',), ('libtpu',), {}, None, False),  # a v4/v5e TPU VM
    (('dev/nvidia0',), ('libtpu', 'jax_cuda12_plugin'), {}, 'cuda,cpu', False),
    ((), ('libtpu', 'jax_cuda12_plugin'), {}, 'cpu', True),  # the plugin, but no GPU
    ((), ('libtpu',), {'JAX_PLATFORMS': 'tpu'}, 'tpu', False),  # the user's choice wins
    ((), (), {}, None, False),  # no libtpu: nothing to avoid
  ]
  for i, (files, packages, env, platforms, shown) in enumerate(cases):
    root = _machine(tmp_path / str(i), *files)
    line = pick(env, root=root, find_spec=_installed(*packages))
    assert env.get('JAX_PLATFORMS') == platforms, (i, env)
    assert (
      (line == 'libtpu is installed, but this machine has no TPU chips: running on the CPU')
      if shown
      else line is None
    ), (i, line)


@pytest.mark.slow
def test_tpu_extra_on_a_cpu_machine_is_quiet(tmp_path, tiny_dir):
  """The test extra installs jax[tpu], so this machine is one: `flmjax chat` shows one stdout
  line, and nothing of libtpu's TPU search on stderr (the environment as a user's: no
  JAX_PLATFORMS, no TPU_* settings that jax's own TPU start-up leaves behind)."""
  import importlib.util
  import os
  import subprocess
  import sys

  import numpy as np

  assert importlib.util.find_spec('libtpu') is not None  # setup.cfg's test extra: jax[tpu]
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ('JAX_PLATFORMS', 'XLA_FLAGS') and not k.startswith('TPU_')
  }
  np.save(tmp_path / 'user.npy', np.zeros((8, 3), np.int32))
  chat = subprocess.run(
    [
      sys.executable,
      '-m',
      'flmjax',
      'chat',
      '--checkpoint',
      str(tiny_dir),
      '--user',
      str(tmp_path / 'user.npy'),
      '--out',
      str(tmp_path / 'out'),
      '--greedy',
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert chat.returncode == 0, chat.stderr[-2000:]
  assert chat.stderr == '', chat.stderr[-2000:]
  assert chat.stdout.splitlines()[0] == (
    'flmjax chat: libtpu is installed, but this machine has no TPU chips: running on the CPU'
  )
  assert sum('TPU' in line for line in chat.stdout.splitlines()) == 1

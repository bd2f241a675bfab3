"""`flmjax train --config experiments/configs/NAME.py [--run_dir DIR] [--init_from DIR]`."""
from __future__ import annotations

import json
import os

from absl import flags

from flmjax.cli import command, fail

PROG = 'flmjax train'
SUMMARY = 'summary.json'


def _flags() -> flags.FlagValues:
  fv = flags.FlagValues()  # a private set: this main() may run many times in one process
  flags.DEFINE_string('config', None, 'Python config file defining get_config(run_dir)',
                      flag_values=fv)
  flags.DEFINE_string('run_dir', None, 'run directory (default: runs/<config name>)',
                      flag_values=fv)
  flags.DEFINE_string('init_from', None, 'official checkpoint directory to fine-tune from',
                      flag_values=fv)
  flags.DEFINE_integer('stop_after', None, 'stop after this global step (resumable)',
                       flag_values=fv)
  flags.DEFINE_bool('progress', True, 'show a progress bar', flag_values=fv)
  return fv


def write_summary(run_dir: str, out: dict) -> str:
  """run_dir/summary.json: the latest step and eval, and every stage summary of every run so far
  (a resumed run appends its own, so nothing of an earlier run is lost). Written atomically."""
  path = os.path.join(run_dir, SUMMARY)
  stages = []
  if os.path.isfile(path):
    try:
      with open(path) as f:
        stages = list(json.load(f).get('stages', []))
    except (OSError, ValueError, AttributeError):
      os.replace(path, path + '.unreadable')  # kept for the user, never overwritten silently
  runs = max((s.get('run', 0) for s in stages), default=0)
  stages += [{**s, 'run': runs + 1} for s in out['stages']]
  summary = {'global_step': out['global_step'], 'stages': stages, 'eval': out['eval']}
  with open(path + '.tmp', 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(path + '.tmp', path)
  return path


@command('flmjax train')
def main(argv: list[str]) -> int:
  from flmjax.train.config import TrainConfigError, load_config_file
  fv = _flags()
  if any(a in ('-h', '--help', '-help', '--helpfull') for a in argv):
    print(f'{__doc__.strip()}\n\nflags:\n{fv.get_help()}')
    return 0
  try:
    fv(['flmjax train'] + list(argv))
  except flags.Error as e:
    return fail(PROG, f'{e} (see flmjax train --help)')
  if not fv.config:
    return fail(PROG, '--config is required (e.g. experiments/configs/tiny_dual.py)')
  if fv.stop_after is not None and fv.stop_after < 1:
    return fail(PROG, f'--stop_after {fv.stop_after} must be >= 1')
  try:
    tc = load_config_file(fv.config, fv.run_dir)
  except TrainConfigError as e:
    return fail(PROG, str(e))
  if os.path.isfile(tc.run_dir):
    return fail(PROG, f'run directory {tc.run_dir} is a file; pass another --run_dir')
  overrides = {'progress_bar': fv.progress}
  if fv.init_from:
    overrides['init_from'] = fv.init_from
  tc = tc.replace(**overrides)
  from flmjax.train.loop import NonFiniteError, train
  try:
    out = train(tc, stop_after=fv.stop_after)
  except (NonFiniteError, TrainConfigError, OSError, ValueError) as e:
    # ValueError covers CheckpointError (--init_from) and the data pipeline's input errors.
    return fail(PROG, f'{type(e).__name__}: {e}')
  write_summary(tc.run_dir, out)
  return 0

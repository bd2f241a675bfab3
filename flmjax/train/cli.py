"""`flmjax train --config experiments/configs/NAME.py [--run_dir DIR] [--init_from DIR]`."""
from __future__ import annotations

import json
import os

from absl import flags


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


def main(argv: list[str]) -> int:
  from flmjax.train.config import TrainConfigError, load_config_file
  fv = _flags()
  if any(a in ('-h', '--help', '-help', '--helpfull') for a in argv):
    print(f'{__doc__.strip()}\n\nflags:\n{fv.get_help()}')
    return 0
  try:
    fv(['flmjax train'] + list(argv))
  except flags.Error as e:
    print(f'flmjax train: {e}\n\nflags:\n{fv.get_help()}')
    return 2
  if not fv.config:
    print('flmjax train: --config is required (e.g. experiments/configs/tiny_dual.py)')
    return 2
  try:
    tc = load_config_file(fv.config, fv.run_dir)
  except TrainConfigError as e:
    print(f'flmjax train: {e}')
    return 2
  overrides = {'progress_bar': fv.progress}
  if fv.init_from:
    overrides['init_from'] = fv.init_from
  tc = tc.replace(**overrides)
  from flmjax.train.loop import NonFiniteError, train
  try:
    out = train(tc, stop_after=fv.stop_after)
  except (NonFiniteError, TrainConfigError, OSError, ValueError) as e:
    # ValueError covers CheckpointError (--init_from) and the data pipeline's input errors.
    print(f'flmjax train: {type(e).__name__}: {e}')
    return 1
  summary = {'global_step': out['global_step'], 'stages': out['stages'], 'eval': out['eval']}
  with open(os.path.join(tc.run_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return 0

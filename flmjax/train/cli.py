"""`flmjax train --config experiments/configs/NAME.py [--run_dir DIR] [--init_from DIR]`.

Several processes (one per host, or N on one box): the same command in each, with
--coordinator_address/--num_processes/--process_id (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
$JAX_PROCESS_ID), or --multihost on a Cloud TPU VM pod slice."""
from __future__ import annotations

import dataclasses
import json
import os

from absl import flags
from etils import epath

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
  # Multi-process jobs: the same command in every process; unset, these come from the
  # environment (flmjax.sharding.initialize_distributed).
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 (default $JAX_COORDINATOR_ADDRESS)', flag_values=fv)
  flags.DEFINE_integer('num_processes', None,
                       'number of processes (default $JAX_NUM_PROCESSES)', flag_values=fv)
  flags.DEFINE_integer('process_id', None,
                       'this process, 0..num_processes-1 (default $JAX_PROCESS_ID)',
                       flag_values=fv)
  flags.DEFINE_bool('multihost', False, 'call jax.distributed.initialize() with no arguments '
                    '(a Cloud TPU VM pod slice)', flag_values=fv)
  return fv


def write_summary(run_dir: str, out: dict) -> str:
  """run_dir/summary.json: the latest step and eval, and every stage summary of every run so far
  (a resumed run appends its own, so nothing of an earlier run is lost). Written atomically."""
  path = epath.Path(run_dir) / SUMMARY
  stages = []
  if path.is_file():
    try:
      stages = list(json.loads(path.read_text()).get('stages', []))
    except (OSError, ValueError, AttributeError):
      path.replace(path.with_name(SUMMARY + '.unreadable'))  # kept, never overwritten silently
  runs = max((s.get('run', 0) for s in stages), default=0)
  stages += [{**s, 'run': runs + 1} for s in out['stages']]
  summary = {'global_step': out['global_step'], 'stages': stages, 'eval': out['eval']}
  tmp = path.with_name(SUMMARY + '.tmp')
  tmp.write_text(json.dumps(summary, indent=2))
  tmp.replace(path)
  return os.fspath(path)


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
  if epath.Path(tc.run_dir).is_file():
    return fail(PROG, f'run directory {tc.run_dir} is a file; pass another --run_dir')
  from flmjax import sharding as shd
  d = tc.distributed  # the config's section; flags win
  pick = lambda flag, ours: ours if flag is None else flag
  distributed = dataclasses.replace(
      d, coordinator_address=pick(fv.coordinator_address, d.coordinator_address),
      num_processes=pick(fv.num_processes, d.num_processes),
      process_id=pick(fv.process_id, d.process_id), multihost=fv.multihost or d.multihost)
  try:  # before anything touches a device
    shd.initialize_distributed(*dataclasses.astuple(distributed))
  except ValueError as e:
    return fail(PROG, str(e))
  overrides = {'progress_bar': fv.progress, 'distributed': distributed}
  if fv.init_from:
    overrides['init_from'] = fv.init_from
  tc = tc.replace(**overrides)
  from flmjax.train.loop import NonFiniteError, train
  try:
    out = train(tc, stop_after=fv.stop_after)
  except (NonFiniteError, TrainConfigError, OSError, ValueError) as e:
    # ValueError covers CheckpointError (--init_from) and the data pipeline's input errors.
    return fail(PROG, f'{type(e).__name__}: {e}')
  if out['preempted']:
    print(f'flmjax train: preempted; step {out["global_step"]} is saved in {tc.run_dir}: run the '
          f'same command to resume')
    return 143  # 128 + SIGTERM, as if the signal had ended the process
  import jax
  if jax.process_index() == 0:
    write_summary(tc.run_dir, out)
  return 0

"""`flmjax train --config CONFIG [--set KEY=VALUE ...] [--run-dir DIR] [--init-from DIR]`, and
`flmjax export CKPT_DIR OUT_DIR`.

CONFIG is a Python file defining get_config(run_dir) (experiments/configs/NAME.py) or the name of
a preset that ships inside the package ({presets}). --set overrides the loaded config's fields,
typed by their annotations (flmjax.train.overrides); the flags below override both.

Several processes (one per host, or N on one box): the same command in each, with
--coordinator-address/--num-processes/--process-id (or $JAX_COORDINATOR_ADDRESS,
$JAX_NUM_PROCESSES, $JAX_PROCESS_ID), or --multihost on a Cloud TPU VM pod slice;
--coordinator-timeout-s bounds the wait for all of them.
The earlier spellings (--run_dir, --noprogress, ...) still work."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from etils import epath

from flmjax.cli import ArgumentParser, add_set_flag, command, config_error, fail, spell

PROG = 'flmjax train'


def _parser() -> ArgumentParser:
  from flmjax.train.config import presets

  parts = __doc__.split('\n\n')
  ap = ArgumentParser(
    prog=PROG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description=parts[0] + '\n\n' + parts[1].format(presets=', '.join(presets())),
    epilog=parts[2],
  )
  ap.add_flag('--config', help='a config file (.py defining get_config(run_dir)) or a preset name')
  add_set_flag(ap)
  ap.add_flag('--run-dir', '--run_dir', help='run directory (default: runs/<config name>)')
  ap.add_flag('--init-from', '--init_from', help='official checkpoint directory to fine-tune from')
  ap.add_flag(
    '--stop-after', '--stop_after', type=int, help='stop after this global step (resumable)'
  )
  ap.add_flag(
    '--no-progress',
    '--noprogress',
    dest='progress',
    action='store_false',
    default=None,
    help='no progress bar (or --set progress_bar=false; else it is on, as the config file says '
    'or not)',
  )
  ap.add_flag('--progress', action='store_true', default=None, help=argparse.SUPPRESS)
  # Multi-process jobs: the same command in every process; unset, these come from the
  # environment (flmjax.distributed.initialize_distributed).
  ap.add_flag(
    '--coordinator-address',
    '--coordinator_address',
    help='host:port of process 0 (default $JAX_COORDINATOR_ADDRESS)',
  )
  ap.add_flag(
    '--num-processes',
    '--num_processes',
    type=int,
    help='number of processes (default $JAX_NUM_PROCESSES)',
  )
  ap.add_flag(
    '--process-id',
    '--process_id',
    type=int,
    help='this process, 0..num_processes-1 (default $JAX_PROCESS_ID)',
  )
  ap.add_flag(
    '--coordinator-timeout-s',
    type=float,
    help='end with an error when the job has not formed (every process joined) '
    'within this many seconds (default 300)',
  )
  ap.add_flag(
    '--multihost',
    action='store_true',
    help='call jax.distributed.initialize() with no arguments (a Cloud TPU VM pod slice)',
  )
  return ap


def _progress_bar(fv: argparse.Namespace) -> dict:
  """The bar is on unless --no-progress, or --set progress_bar=..., says otherwise (the config
  file's own value is not read, as it never was)."""
  if fv.progress is None and any(o.startswith('progress_bar=') for o in fv.overrides):
    return {}
  return {'progress_bar': fv.progress is not False}


# the library's argument names in its errors (flmjax.cli.spell) -> the flags of train and export
FLAGS = {'run_dir': '--run-dir', 'init_from': '--init-from'}
EXPORT_FLAGS = {'out': 'OUT_DIR', 'overwrite': '--overwrite'}


@command('flmjax train', FLAGS)
def main(argv: list[str]) -> int:
  from flmjax.train.config import TrainConfigError
  from flmjax.train.overrides import load_config

  fv = _parser().parse_args(argv)
  if not fv.config:
    return fail(PROG, '--config is required (e.g. experiments/configs/tiny_dual.py)')
  if fv.stop_after is not None and fv.stop_after < 1:
    return fail(PROG, f'--stop-after {fv.stop_after} must be >= 1')
  try:
    tc = load_config(fv.config, fv.run_dir, fv.overrides)
  except TrainConfigError as e:
    return fail(PROG, spell(config_error(e), FLAGS))
  from flmjax.checkpoint.storage import check_run_dir

  check_run_dir(tc.run_dir)  # OSError: one line (a file in the way, a bucket out of reach)
  from flmjax.distributed import initialize_distributed

  d = tc.distributed  # the config's section; flags win
  pick = lambda flag, ours: ours if flag is None else flag
  distributed = dataclasses.replace(
    d,
    coordinator_address=pick(fv.coordinator_address, d.coordinator_address),
    num_processes=pick(fv.num_processes, d.num_processes),
    process_id=pick(fv.process_id, d.process_id),
    multihost=fv.multihost or d.multihost,
    coordinator_timeout_s=pick(fv.coordinator_timeout_s, d.coordinator_timeout_s),
  )

  def timed_out(message: str):  # from a watchdog thread, while jax blocks the main one
    fail(PROG, spell(message, FLAGS))
    sys.stderr.flush()
    os._exit(1)

  try:  # before anything touches a device
    initialize_distributed(*dataclasses.astuple(distributed), on_timeout=timed_out)
  except ValueError as e:
    return fail(PROG, spell(str(e), FLAGS))
  # the command's own flags win over the config and --set
  flags = {'distributed': distributed, **_progress_bar(fv)}
  if fv.init_from:
    flags['init_from'] = fv.init_from
  tc = tc.replace(**flags)
  from flmjax.train.loop import NonFiniteError, train

  try:
    out = train(tc, stop_after=fv.stop_after)
  except (NonFiniteError, TrainConfigError, OSError, ValueError) as e:
    # ValueError covers CheckpointError (--init-from) and the data pipeline's input errors.
    return fail(PROG, spell(f'{type(e).__name__}: {e}', FLAGS))
  if out['preempted']:
    print(
      f'flmjax train: preempted; step {out["global_step"]} is saved in {tc.run_dir}: run the '
      f'same command to resume'
    )
    return 143  # 128 + SIGTERM, as if the signal had ended the process
  import jax

  if jax.process_index() == 0:
    from flmjax.train.observe import write_summary

    write_summary(tc.run_dir, out)
  return 0


@command('flmjax export', EXPORT_FLAGS)
def export_main(argv: list[str]) -> int:
  """`flmjax export CKPT_DIR OUT_DIR`: an orbax training checkpoint -> the official layout; a
  LoRA run merged (--merge, the default) or as a PEFT adapter (--adapters)."""
  from flmjax.checkpoint.restore import checkpoint_dir, require_lora
  from flmjax.checkpoint.storage import check_remote
  from flmjax.train.export import export

  ap = ArgumentParser(
    prog='flmjax export', description='orbax training checkpoint -> official safetensors'
  )
  ap.add_argument('ckpt_dir', help='a run directory or its checkpoints/ directory')
  ap.add_argument('out_dir')
  ap.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  ap.add_argument(
    '--dtype',
    default=None,
    choices=('float32', 'bfloat16', 'float16'),
    help="default: the model config's checkpoint_dtype",
  )
  ap.add_argument(
    '--overwrite',
    action='store_true',
    help="replace OUT_DIR's checkpoint files (other files in it are kept)",
  )
  ap.add_argument(
    '--merge',
    action='store_true',
    help='LoRA run: the adapters merged into the base, official layout (default)',
  )
  ap.add_argument(
    '--adapters',
    action='store_true',
    help='LoRA run: a PEFT adapter for the official PyTorch model '
    '(adapter_config.json + adapter_model.safetensors)',
  )
  ap.add_argument(
    '--base',
    default=None,
    help="LoRA run: the official checkpoint it was trained on (default: the run's init_from)",
  )
  args = ap.parse_args(argv)
  if args.merge and args.adapters:
    ap.error(
      '--merge and --adapters exclude each other: merge the adapters into the base, or '
      'write them as a PEFT adapter'
    )
  checkpoint_dir(args.ckpt_dir)  # the input first, then where it goes
  flag = next(
    (
      f
      for f, on in (('--adapters', args.adapters), ('--merge', args.merge), ('--base', args.base))
      if on
    ),
    None,
  )
  if flag:
    require_lora(args.ckpt_dir, args.step, flag)
  kw = dict(
    step=args.step, dtype=args.dtype, overwrite=args.overwrite, peft=args.adapters, base=args.base
  )
  if '://' in args.out_dir:
    check_remote(args.out_dir)
    path = export(args.ckpt_dir, args.out_dir, **kw)
    print(f'wrote {path}: {", ".join(sorted(p.name for p in epath.Path(path).iterdir()))}')
    return 0
  out_dir = os.path.abspath(args.out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'OUT_DIR {args.out_dir} is a file; give a directory')
  if os.path.exists(out_dir) and not args.overwrite:
    raise FileExistsError(
      f'OUT_DIR {args.out_dir} exists; pass --overwrite to replace its '
      'checkpoint files (other files in it are kept)'
    )
  path = export(args.ckpt_dir, out_dir, **kw)
  print(f'wrote {path}: {", ".join(sorted(os.listdir(path)))}')
  return 0

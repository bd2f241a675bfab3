"""`flmjax main`: the embedded default, end to end.

Trains flmjax/configs/tiny_dual.py, which ships inside the package (synthetic corpus, ASR+TTS
stage then duplex stage; `--steps 2,2` for a smoke run) and shows what the trained model does:
teacher-forced accuracies per stream on held-out samples, next to the untrained model's, then
full-duplex streaming chat on the held-out conversation sets (flmjax.data.corpus.HELDOUT_DUPLEX:
standard, long pauses, 2x slower, another seed and settings), each frame attending to the last
frames of the longest training window. `--parity` instead checks the
forward against the golden fixtures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from flmjax.cli import ArgumentParser, add_set_flag, config_error, fail, spell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'tiny_dual.py')
# the library's argument names in its errors -> this command's flags (the dispatcher, cli.spell)
FLAGS = {'run_dir': '--run-dir'}


def _steps(text: str) -> tuple[int, ...]:
  try:
    steps = tuple(int(n) for n in text.split(','))
  except ValueError:
    steps = ()
  if not steps or min(steps) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: give whole numbers >= 1, one per stage (e.g. 2,2)')
  return steps


def main(argv: list[str] | None = None) -> int:
  ap = ArgumentParser(prog='flmjax main')
  ap.add_argument(
    '--config',
    default=DEFAULT_CONFIG,
    help='a config file (.py defining get_config(run_dir)) or a preset name (flmjax train '
    '--help lists them); default: the tiny_dual preset',
  )
  add_set_flag(ap)
  ap.add_flag('--run-dir', '--run_dir', default=os.path.join('runs', 'tiny_dual'))
  ap.add_argument('--parity', action='store_true', help='only check golden forward parity')
  ap.add_argument('--golden', default=os.path.join(REPO, 'tests', 'golden'))
  ap.add_argument(
    '--steps',
    type=_steps,
    help="steps of each stage, e.g. 2,2 (a smoke run); default: the config's own",
  )
  args = ap.parse_args(argv)
  if args.parity:
    from flmjax.checkpoint.golden import parity

    report = parity(args.golden)
    for k, v in report.items():
      print(f'{k:22s} {v:.3e}' if 'argmax' not in k else f'{k:22s} {v:.4f}')
    ok = all(v < 1e-5 for k, v in report.items() if 'argmax' not in k)
    print('parity with the official PyTorch forward:', 'OK' if ok else 'FAILED')
    return 0 if ok else 1
  from flmjax.eval import heldout as heldout_lib
  from flmjax.train.config import TrainConfigError
  from flmjax.train.evaluate import show as show_heldout
  from flmjax.train.loop import train
  from flmjax.train.overrides import load_config

  t0 = time.time()
  try:
    kw = {'steps': args.steps} if args.steps else {}
    tc = load_config(args.config, args.run_dir, args.overrides, **kw)
  except TrainConfigError as e:
    return fail('flmjax main', spell(config_error(e), FLAGS))
  heldout = heldout_lib.heldout_sets(tc)
  tc = tc.replace(eval_sources=())  # evaluated below, next to the untrained model
  print(
    f'training {args.config} in {os.path.abspath(tc.run_dir)}: '
    + ', '.join(f'{s.name} {s.steps} steps' for s in tc.stages)
  )
  result = train(tc)
  train_s = time.time() - t0
  table = show_heldout(tc, result, heldout)
  # The model never attended further back than its longest training window: streamed over a whole
  # conversation, later answers degrade (experiments/RESULTS.md, issue 29 arm 5).
  window = max(tc.stage_window(i) for i in range(len(tc.stages)))
  table['chat'] = heldout_lib.chat(tc, result, attention_window=window)
  table['attention_window'] = window
  with open(os.path.join(tc.run_dir, 'heldout.json'), 'w') as f:
    json.dump(table, f, indent=2)
  print(
    f'\ntrained in {train_s:.0f}s (total {time.time() - t0:.0f}s); loss curves: '
    f'{os.path.join(tc.run_dir, "loss_*.png")}; TensorBoard: '
    f'{os.path.join(tc.run_dir, "tensorboard")}; checkpoints: '
    f'{os.path.join(tc.run_dir, "checkpoints")} (export with `flmjax export`)'
  )
  return 0

"""Issue 29's seed study (experiments/RESULTS.md, arm 4): per run and per arm, the held-out sets'
exact answers and turn-taking from each run's heldout.json; per arm the mean over seeds with a
95% t-interval over seeds, and arm - control paired by seed.

  python experiments/seed_table.py control=/runs/default,/runs/ctl-s1,... E=/runs/E-s0,...

Each run directory is a `flmjax main` run (its heldout.json) or a directory of `flmjax eval
duplex` reports, one per held-out set; runs are listed in seed order; the first arm named is the
control.
"""

from __future__ import annotations

import json
import math
import os
import sys

SETS = ('heldout_duplex', 'heldout_long_pauses', 'heldout_slow', 'heldout_other')
LABELS = ('1 standard', '2 long pauses', '3 2x slower', '4 other (not tuned on)')
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # Student t, two-sided 95%, by dof


def run_metrics(run_dir: str) -> dict[str, dict[str, float]]:
  """set -> {'exact', 'pause_takeover', 'interrupt_stop', 'takeover'} for one run: a `flmjax
  main` run directory (its heldout.json), or a directory of `flmjax eval duplex` reports, one
  per set (DIR/SET/report.json)."""
  if os.path.exists(os.path.join(run_dir, 'heldout.json')):
    with open(os.path.join(run_dir, 'heldout.json')) as f:
      chat = json.load(f)['chat']
  else:
    chat = {}
    for name in SETS:
      with open(os.path.join(run_dir, name, 'report.json')) as f:
        chat[name] = json.load(f)
  out = {}
  for name in SETS:
    tt = chat[name]['turn_taking']
    out[name] = {
      'exact': chat[name]['turn_accuracy'],
      'pause_takeover': tt['pause_takeover_rate'],
      'interrupt_stop': tt['interrupt_stop_rate'],
      'takeover': tt['takeover_rate'],
    }
  return out


def mean_interval(values: list[float]) -> str:
  n = len(values)
  m = sum(values) / n
  if n < 2:
    return f'{m:.3f}'
  sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
  h = T975[n - 1] * sd / math.sqrt(n)
  return f'{m:.3f} [{m - h:.3f}, {m + h:.3f}]'


def main(argv: list[str]) -> None:
  arms = {}
  for spec in argv:
    name, dirs = spec.split('=', 1)
    arms[name] = [run_metrics(d) for d in dirs.split(',')]
  print('| arm | seed | ' + ' | '.join(LABELS) + ' | mean of 1-3 |')
  print('|---' * (len(SETS) + 3) + '|')
  for name, runs in arms.items():
    for seed, r in enumerate(runs):
      ex = [r[s]['exact'] for s in SETS]
      print(
        f'| {name} | {seed} | ' + ' | '.join(f'{v:.3f}' for v in ex) + f' | {sum(ex[:3]) / 3:.3f} |'
      )
  print('\nMean over seeds, 95% t-interval over seeds:\n')
  for metric in ('exact', 'pause_takeover', 'interrupt_stop', 'takeover'):
    print(f'\n{metric}:\n')
    print('| arm | ' + ' | '.join(LABELS) + ' | mean of 1-3 |')
    print('|---' * (len(SETS) + 2) + '|')
    for name, runs in arms.items():
      cells = [mean_interval([r[s][metric] for r in runs]) for s in SETS]
      means = [sum(r[s][metric] for s in SETS[:3]) / 3 for r in runs]
      print(f'| {name} | ' + ' | '.join(cells) + f' | {mean_interval(means)} |')
  names = list(arms)
  control = arms[names[0]]
  for name in names[1:]:
    runs = arms[name]
    n = min(len(runs), len(control))
    diffs = [
      sum(runs[i][s]['exact'] - control[i][s]['exact'] for s in SETS[:3]) / 3 for i in range(n)
    ]
    print(
      f'\n{name} - {names[0]}, mean exact answers over sets 1-3, paired by seed: '
      + ', '.join(f'{d:+.3f}' for d in diffs)
      + f'; mean {mean_interval(diffs)}'
    )


if __name__ == '__main__':
  main(sys.argv[1:])

"""The paper's dual-training ablation, in miniature: drop the trail (ASR-style) samples.

Trains experiments/configs/tiny_dual.py twice per seed, once as is and once with `no_trail=True`
(stage 1 keeps only TTS-style lead samples), then compares on held-out data:
- ASR: single-speaker speech on the listen stream, its text trailing (text accuracy);
- TTS: the same speech on the speak stream, its text leading (text and semantic accuracy);
- duplex: teacher-forced accuracies and streaming chat turns answered exactly right.
ASR and TTS are measured twice: at the end of stage 1 (the run stops there, is evaluated, then
resumes exactly), where the trail samples act, and at the end, after the duplex stage.
The seed sets the initialisation and the data order; the corpus is the same for every run.

  .venv/bin/python experiments/ablation_no_trail.py [--root runs/ablation] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

from flmjax import main as main_lib
from flmjax.platforms import cpu_unless_accelerator
from flmjax.train.evaluate import evaluate
from flmjax.train.loop import train

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'tiny_dual.py')
VARIANTS = ('dual', 'no_trail')


def run(variant: str, seed: int, root: str) -> dict:
  spec = importlib.util.spec_from_file_location('tiny_dual', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tc = module.get_config(os.path.join(root, f'{variant}_seed{seed}'),
                         no_trail=(variant == 'no_trail'), seed=seed)
  sets = main_lib.heldout_sets(tc)
  tc = tc.replace(eval_sources=(), progress_bar=False)
  quiet = lambda *a, **k: None
  row, t0 = {}, time.time()
  stage1 = train(tc, stop_after=tc.stages[0].steps, log=quiet)  # saved; the next call resumes
  for name, sources in sets.items():
    if not name.startswith('duplex'):
      m = evaluate(tc, stage1['spec'], stage1['mesh'], stage1['state'].params, sources)
      row[f'after stage 1, {name}: acc_text'] = m['acc_text']
  result = train(tc, log=quiet)
  row['train_s'] = time.time() - t0
  for name, sources in sets.items():
    m = evaluate(tc, result['spec'], result['mesh'], result['state'].params, sources)
    for k in ('acc_text', 'acc_semantic'):
      if not (k == 'acc_semantic' and name.startswith('ASR')):
        row[f'{name}: {k}'] = m[k]
  row['streaming chat: turns right'] = main_lib.chat(tc, result)['turn_accuracy']
  return row


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--root', default=os.path.join('runs', 'ablation'))
  ap.add_argument('--seeds', default='0,1,2', help='comma-separated training seeds')
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  path = os.path.join(args.root, 'ablation.json')
  rows = {}
  if os.path.exists(path):  # a finished (variant, seed) is not trained again
    with open(path) as f:
      rows = json.load(f)
  for seed in seeds:
    for variant in VARIANTS:
      key = f'{variant}_seed{seed}'
      if key not in rows:
        rows[key] = run(variant, seed, args.root)
        with open(path, 'w') as f:
          json.dump(rows, f, indent=2)
  stat = lambda v: f'{np.mean(v):.3f} ± {np.std(v):.3f} ({min(v):.3f}–{max(v):.3f})'
  print(f'\nseeds {seeds}: mean ± std (min–max)\n'
        '| held-out metric | dual (lead + trail) | no trail (lead only) |\n|---|---|---|')
  for metric in rows[f'dual_seed{seeds[0]}']:
    cells = [stat([rows[f'{v}_seed{s}'][metric] for s in seeds]) for v in VARIANTS]
    print(f'| {metric} | {cells[0]} | {cells[1]} |')


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()

"""The paper's dual-training ablation, in miniature: drop the trail (ASR-style) samples.

Trains experiments/configs/tiny_dual.py twice from the same seed, once as is and once with
`no_trail=True` (stage 1 keeps only TTS-style lead samples), then compares on held-out data:
- ASR: single-speaker speech on the listen stream, its text trailing (text accuracy);
- TTS: the same speech on the speak stream, its text leading (semantic accuracy);
- duplex: teacher-forced accuracies and streaming chat turns answered exactly right.

  .venv/bin/python experiments/ablation_no_trail.py [--root runs/ablation]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

from flmjax import main as main_lib
from flmjax.train.evaluate import evaluate
from flmjax.train.loop import train

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'tiny_dual.py')


def run(variant: str, root: str) -> dict:
  spec = importlib.util.spec_from_file_location('tiny_dual', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tc = module.get_config(os.path.join(root, variant), no_trail=(variant == 'no_trail'))
  sets = main_lib.heldout_sets(tc)
  t0 = time.time()
  result = train(tc.replace(eval_sources=(), progress_bar=False), log=lambda *a, **k: None)
  row = {'train_s': time.time() - t0}
  for name, sources in sets.items():
    m = evaluate(tc, result['spec'], result['mesh'], result['state'].params, sources)
    row[name] = {k: m[k] for k in ('acc_text', 'acc_semantic', 'loss')}
  row['chat_turn_accuracy'] = main_lib.chat(tc, result)['turn_accuracy']
  return row


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--root', default=os.path.join('runs', 'ablation'))
  args = ap.parse_args()
  rows = {v: run(v, args.root) for v in ('dual', 'no_trail')}
  print('\n| held-out metric | dual (lead + trail) | no trail (lead only) |\n|---|---|---|')
  for name in rows['dual']:
    if isinstance(rows['dual'][name], dict):
      for k in ('acc_text',) if name.startswith('ASR') else ('acc_text', 'acc_semantic'):
        print(f'| {name}: {k} | {rows["dual"][name][k]:.3f} | {rows["no_trail"][name][k]:.3f} |')
  for k in ('chat_turn_accuracy', 'train_s'):
    print(f'| {k} | {rows["dual"][k]:.3f} | {rows["no_trail"][k]:.3f} |')
  with open(os.path.join(args.root, 'ablation.json'), 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()

"""`flmjax main`: the embedded default, end to end.

Today: load the golden tiny checkpoint and report forward parity with the official code.
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def parity(golden_dir: str) -> dict[str, float]:
  import flmjax
  model = flmjax.load_official(os.path.join(golden_dir, 'flm_tiny'), dtype='float32')
  ref = np.load(os.path.join(golden_dir, 'flm_tiny', 'forward.npz'))
  out = model(ref['text'], ref['speak'], ref['listen'], ref['depth_tokens'][..., :-1])
  report = {}
  for name, ours in (('hidden', out.hidden), ('text_logits', out.text_logits),
                     ('depth_logits', out.depth_logits)):
    ours = np.asarray(ours)
    report[name] = float(np.linalg.norm(ours - ref[name]) / np.linalg.norm(ref[name]))
    if name != 'hidden':
      report[name + '_argmax'] = float((ours.argmax(-1) == ref[name].argmax(-1)).mean())
  return report


def main(argv: list[str] | None = None) -> int:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ap = argparse.ArgumentParser(prog='flmjax main')
  ap.add_argument('--golden', default=os.path.join(os.path.dirname(here), 'shared', 'golden'))
  args = ap.parse_args(argv)
  report = parity(args.golden)
  for k, v in report.items():
    print(f'{k:22s} {v:.3e}' if 'argmax' not in k else f'{k:22s} {v:.4f}')
  ok = all(v < 1e-5 for k, v in report.items() if 'argmax' not in k)
  print('parity with the official PyTorch forward:', 'OK' if ok else 'FAILED')
  return 0 if ok else 1

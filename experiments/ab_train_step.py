"""One side of a train-step A/B: the median step time of the `tiny` step at batch 32 x 64 (the
embedded default's duplex step) and the `small` step at 8 x 256, the matmul peak measured in the
same process, and the last step's loss (equal on both sides when the change is exact).

  PYTHONPATH=/path/to/before .venv/bin/python experiments/ab_train_step.py out.jsonl [tiny] [small]
  PYTHONPATH=. .venv/bin/python experiments/ab_train_step.py out.jsonl [tiny] [small]

PYTHONPATH picks the tree whose flmjax is timed; run the sides alternately, in separate processes.
Appends one JSON line per run to out.jsonl.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import MatmulPeak, global_batch, train_setup
from bench_train import model_flops

import flmjax
from flmjax.config import ModelConfig
from flmjax.train import step as sp

SHAPES = {'tiny': (ModelConfig.tiny, 32, 64, 15), 'small': (ModelConfig.small, 8, 256, 3)}


def main(out: str, names: list[str]) -> dict:
  result = {'tree': flmjax.__file__}
  peak = MatmulPeak()
  for name in names or list(SHAPES):
    preset, batch, window, steps = SHAPES[name]
    cfg = preset()
    tc, mesh, spec, state, loader = train_setup(
      cfg, batch, window, compute_dtype='float32', remat='none'
    )
    data, lr = global_batch(loader, mesh), jnp.float32(1e-4)
    step = sp.jit_train_step(spec, tc, mesh)
    state, m = step(state, data, lr)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = step(state, data, lr)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    result[name] = {
      'step_s': float(np.median(times)),
      'fastest_s': float(min(times)),
      'loss': float(m['loss']),
      'model_gflop': model_flops(cfg, batch, window - 1) / 1e9,
    }
  result['peak_gflops'] = peak.sample() / 1e9
  with open(out, 'a') as f:
    f.write(json.dumps(result) + '\n')
  return result


if __name__ == '__main__':
  if len(sys.argv) < 2 or any(n not in SHAPES for n in sys.argv[2:]):
    print(f'usage: ab_train_step.py OUT.jsonl [{"] [".join(SHAPES)}]', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(main(sys.argv[1], sys.argv[2:])))

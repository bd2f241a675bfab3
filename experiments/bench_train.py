"""Train-step benchmark: step time, frames/s and achieved FLOP/s as a fraction of this machine's
measured matmul FLOP/s (measured in the same run).

  .venv/bin/python experiments/bench_train.py [--presets tiny,small] [--steps 5]
  .venv/bin/python experiments/bench_train.py --loop [--presets tiny] [--steps 40]
      [--grad-accum 2] [--log-every 10]
  .venv/bin/python experiments/bench_train.py --presets small --lora-rank 64
  PYTHONPATH=/path/to/tree .venv/bin/python experiments/bench_train.py --presets tiny_b32,small \
      --steps 15 --json SIDE.json   # one side of an A/B: PYTHONPATH picks the flmjax that is timed

Each row keeps the last timed step's loss, equal on both sides of an A/B when a change is exact.
`tiny_b32` is the embedded default's duplex step (batch 32 x 64).

--lora-rank R also times each preset's LoRA step (rank R, alpha R, attn + mlp, a frozen base in
the benchmark's dtype) right after its full fine-tuning step, and reports both states' bytes
(params + optimizer, plus the frozen base) and the ratios.

--loop times the whole training loop as `flmjax train` runs it (data, step dispatch, metrics,
the final checkpoint): seconds per step of a second run, after a first run compiled the step.

FLOPs per step come from XLA's cost analysis of the compiled step (everything it executes) and,
for comparison, the usual 6 * (matmul params) * tokens + attention estimate of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import MatmulPeak, global_batch, train_setup

from flmjax.config import ModelConfig
from flmjax.model import transforms
from flmjax.model.lora import LoraConfig
from flmjax.platforms import cpu_unless_accelerator
from flmjax.train import state as st
from flmjax.train import step as sp
from flmjax.train.config import StageConfig, TrainConfig


def model_flops(cfg: ModelConfig, batch: int, cols: int) -> float:
  """6 * N_matmul * tokens for the backbone, heads and depth transformer, plus attention."""
  D, L, F = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
  NH, KH, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  backbone = L * (D * NH * H * 2 + 2 * D * KH * H + 3 * D * F)
  head = D * cfg.vocab_size + D * cfg.num_codebooks * cfg.depth_dim
  d, Ld, C = cfg.depth_dim, cfg.depth_layers, cfg.num_codebooks
  depth = C * (Ld * (4 * d * d + 3 * d * cfg.depth_mlp_dim) + d * cfg.audio_vocab_size)
  tokens = batch * cols
  attn = 6 * 2 * L * NH * H * cols * cols / 2 * batch + 6 * 2 * Ld * d * C * C / 2 * tokens
  return 6.0 * (backbone + head + depth) * tokens + attn


def bench(
  name: str,
  cfg: ModelConfig,
  batch: int,
  window: int,
  steps: int,
  dtype: str,
  remat: str,
  peak: MatmulPeak,
  lora=None,
) -> dict:
  tc, mesh, spec, state, loader = train_setup(
    cfg, batch, window, compute_dtype=dtype, remat=remat, lora=lora
  )
  frozen = () if lora is None else (st.init_base(spec, tc),)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves((state, frozen)))
  batch_arr = global_batch(loader, mesh)
  lr = jnp.float32(1e-4)
  step = sp.jit_train_step(spec, tc, mesh)
  fn = lambda state, batch, lr: step(state, batch, lr, *frozen)
  t = time.perf_counter()
  compiled = step.lower(state, batch_arr, lr, *frozen).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', float('nan')))
  state, m = fn(state, batch_arr, lr)
  jax.block_until_ready(m)
  times, peaks = [], []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = fn(state, batch_arr, lr)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    peaks.append(peak.sample())
  step_s = float(np.median(times))
  mflops = model_flops(cfg, batch, window - 1)
  return {
    'peak_flops': float(np.median(peaks)),
    'model_frac_paired': float(np.median([mflops / t / p for t, p in zip(times, peaks)])),
    'preset': name,
    'mode': 'full' if lora is None else f'lora r{lora.rank}',
    'trainable_M': st.num_params(state.params) / 1e6,
    'state_MiB': state_bytes / 2**20,
    'params_M': st.num_params(transforms.join(frozen[0] if frozen else None, state.params)) / 1e6,
    'batch': batch,
    'window': window,
    'dtype': dtype,
    'remat': remat,
    'compile_s': compile_s,
    'step_s': step_s,
    'frames_per_s': batch * (window - 1) / step_s,
    'xla_flops': xla_flops,
    'model_flops': model_flops(cfg, batch, window - 1),
    'loss': float(m['loss']),
  }


def bench_loop(
  name: str,
  cfg: ModelConfig,
  batch: int,
  window: int,
  steps: int,
  dtype: str,
  remat: str,
  grad_accum: int,
  log_every: int,
) -> dict:
  import tempfile

  import flmjax
  from flmjax.train.loop import train

  stage = lambda n: (StageConfig('bench', n, random_data=True),)
  tc = TrainConfig(
    model=cfg,
    stages=stage(steps),
    run_dir='',
    window=window,
    batch_size=batch,
    grad_accum=grad_accum,
    compute_dtype=dtype,
    remat=remat,
    log_every=log_every,
    checkpoint_every=10**6,
    progress_bar=False,
  )
  quiet = lambda *a, **k: None
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    train(tc.replace(run_dir=f'{tmp}/warm', stages=stage(2)), log=quiet)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    train(tc.replace(run_dir=f'{tmp}/timed'), log=quiet)
    total = time.perf_counter() - t
  return {
    'preset': name,
    'flmjax': os.path.dirname(flmjax.__file__),
    'batch': batch,
    'window': window,
    'grad_accum': grad_accum,
    'log_every': log_every,
    'steps': steps,
    'first_run_2_steps_s': first_s,
    'step_s': total / steps,
    'frames_per_s': steps * batch * (window - 1) / total,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--presets', default='tiny,small')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--remat', default='none')
  ap.add_argument('--json', default=None)
  ap.add_argument('--loop', action='store_true', help='time the whole training loop')
  ap.add_argument('--grad-accum', type=int, default=1)
  ap.add_argument('--log-every', type=int, default=10)
  ap.add_argument(
    '--lora-rank',
    type=int,
    default=None,
    help='also time the LoRA step of this rank (attn + mlp), same run',
  )
  args = ap.parse_args()
  shapes = {
    'tiny': (ModelConfig.tiny(), 16, 64),
    'tiny_b32': (ModelConfig.tiny(), 32, 64),
    'small': (ModelConfig.small(), 8, 256),
    'small_b16': (ModelConfig.small(), 16, 256),
  }
  if args.loop:
    for name in args.presets.split(','):
      cfg, batch, window = shapes[name]
      print(
        json.dumps(
          bench_loop(
            name,
            cfg,
            batch,
            window,
            args.steps,
            args.dtype,
            args.remat,
            args.grad_accum,
            args.log_every,
          )
        )
      )
    return
  peak = MatmulPeak(dtype=jnp.dtype(args.dtype))
  print(
    f'device: {jax.devices()[0].device_kind} x{jax.device_count()}; '
    f'matmul peak ({args.dtype}, 2048^3) now: {peak.sample() / 1e9:.1f} GFLOP/s'
  )
  rows = []
  for name in args.presets.split(','):
    cfg, batch, window = shapes[name]
    loras = [None]
    if args.lora_rank:
      loras.append(LoraConfig(args.lora_rank, float(args.lora_rank), base_dtype=args.dtype))
    for lora in loras:
      r = bench(name, cfg, batch, window, args.steps, args.dtype, args.remat, peak, lora)
      r['xla_frac'] = r['xla_flops'] / r['step_s'] / r['peak_flops']
      rows.append(r)
  print('XLA FLOPs come from cost_analysis, which counts a scan body once: an undercount.')
  print(
    '| preset | mode | params | trainable | state | batch x window | dtype | step | frames/s '
    '| matmul peak | model GFLOP/s | of peak (paired) | XLA-counted GFLOP/s | compile |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["preset"]} | {r["mode"]} | {r["params_M"]:.1f}M | {r["trainable_M"]:.2f}M '
      f'| {r["state_MiB"]:.0f} MiB | {r["batch"]}x{r["window"]} | {r["dtype"]} '
      f'| {r["step_s"] * 1e3:.0f} ms | {r["frames_per_s"]:.0f} '
      f'| {r["peak_flops"] / 1e9:.1f} GFLOP/s | {r["model_flops"] / r["step_s"] / 1e9:.1f} '
      f'| {r["model_frac_paired"]:.0%} | {r["xla_flops"] / r["step_s"] / 1e9:.1f} '
      f'| {r["compile_s"]:.0f} s |'
    )
  for full, lora in zip(rows, rows[1:]):
    if full['mode'] == 'full' and lora['mode'] != 'full' and full['preset'] == lora['preset']:
      print(
        f'{lora["preset"]}: {lora["mode"]} / full: step time '
        f'{lora["step_s"] / full["step_s"]:.2f}x, state bytes '
        f'{lora["state_MiB"] / full["state_MiB"]:.3f}x, trainable params '
        f'{lora["trainable_M"] / full["trainable_M"]:.4f}x (one run)'
      )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()

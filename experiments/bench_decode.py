"""Streaming-decode benchmark: per-frame latency, frames/s per batch size, compile time, and the
weight-read floor (parameter bytes / memory bandwidth measured in the same run).

  python experiments/bench_decode.py                       # `small` preset, CPU
  python experiments/bench_decode.py --preset flm_8b --dtype bfloat16 --batches 1,8   # GPU

Random weights (nothing is loaded). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import frame_weight_bytes, read_bandwidth
from flax import nnx

from flmjax.config import ModelConfig
from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.model import create
from flmjax.platforms import cpu_unless_accelerator


def bench(model, sampling, batch, frames, max_len, overflow):
  dec = StreamingDecoder(model, sampling, max_len=max_len, overflow=overflow)
  rng = np.random.default_rng(0)
  user = rng.integers(0, 2048, (frames + 3, batch, model.cfg.num_codebooks)).astype(np.int32)
  t = time.perf_counter()
  state = dec.init(batch)
  jax.block_until_ready(state)
  state, out, _ = dec.step(state, user[0])
  out.block_until_ready()
  first = time.perf_counter() - t
  for u in user[1:3]:  # warm up
    state, out, _ = dec.step(state, u)
  out.block_until_ready()
  times = []
  for u in user[3:]:
    t = time.perf_counter()
    state, out, valid = dec.step(state, u)
    np.asarray(out)  # a streaming server reads every frame's tokens
    times.append(time.perf_counter() - t)
  times = np.asarray(times)
  return dict(
    first=first,
    median=float(np.median(times)),
    p90=float(np.percentile(times, 90)),
    fps=batch / float(times.mean()),
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--preset', default='small', choices=('tiny', 'small', 'flm_8b'))
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--batches', default='1,8,32')
  ap.add_argument('--frames', type=int, default=40, help='timed frames per batch size')
  ap.add_argument('--max-len', type=int, default=1024, help='KV-cache frames (1024 = 82 s)')
  ap.add_argument('--overflow', default='error', choices=('error', 'slide'))
  args = ap.parse_args()
  cfg = getattr(ModelConfig, args.preset)(dtype=args.dtype, param_dtype=args.dtype)
  t = time.perf_counter()
  model = create(cfg)
  jax.block_until_ready(nnx.state(model))
  print(f'model {args.preset} ({args.dtype}) created in {time.perf_counter() - t:.1f} s')
  total, per_frame = frame_weight_bytes(model)
  bw = read_bandwidth()
  dev = jax.devices()[0]
  print(
    f'\ndevice: {dev.platform} {dev.device_kind} x{jax.device_count()}, '
    f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
    f'jax {jax.__version__}; load average {os.getloadavg()[0]:.1f} (others share the machine '
    f'when this exceeds 0)'
  )
  count = total // jnp.dtype(args.dtype).itemsize
  print(
    f'parameters: {total / 1e6:.1f} MB ({count / 1e6:.1f} M); '
    f'read per frame: {per_frame / 1e6:.1f} MB; measured read bandwidth {bw / 1e9:.1f} GB/s'
  )
  print(
    f'weight-read floor per frame: {1e3 * per_frame / bw:.2f} ms (all parameters: '
    f'{1e3 * total / bw:.2f} ms)\n'
  )
  official = SamplingConfig()
  greedy = SamplingConfig(greedy=True)
  rows = [(b, 'official sampling', official) for b in map(int, args.batches.split(','))]
  rows.insert(1, (rows[0][0], 'greedy', greedy))
  print(f'max_len {args.max_len}, overflow={args.overflow!r}, {args.frames} timed frames\n')
  print(
    '| B | sampling | first step (compile + run) s | median ms/frame | p90 ms/frame '
    '| frames/s (all sessions) | x real time (12.5 fps each) |'
  )
  print('|---|---|---|---|---|---|---|')
  for batch, name, sampling in rows:
    r = bench(model, sampling, batch, args.frames, args.max_len, args.overflow)
    print(
      f'| {batch} | {name} | {r["first"]:.1f} | {1e3 * r["median"]:.1f} | '
      f'{1e3 * r["p90"]:.1f} | {r["fps"]:.1f} | {r["fps"] / 12.5 / batch:.2f} |',
      flush=True,
    )
  print(f'\nload average at the end: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()

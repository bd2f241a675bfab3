"""Paged against contiguous KV cache: the decode frame of sessions 100 positions in.

Design (fixed before any arm ran):
- model `small` (float32, random weights), official sampling, B sessions (default 8), the same
  user codes for every arm; each arm first steps its sessions to position `--warm` (100).
- arms: contiguous max_len 256 (the reference: a cache barely larger than the sessions);
  paged max_len 8192, page_size 128, a pool of B x 64 pages (the memory of a contiguous 8192
  cache, so any session could reach 8192); contiguous max_len 8192 (what paging replaces).
- timed: `--rounds` rounds; in each, every arm runs `--frames` frames (reading each frame's
  tokens, as a server does), arms in turn, so a busy spell of the shared box hits all arms alike.
  Reported: each arm's median ms/frame over all its frames, and the ratios of medians to the
  256 arm, with a bootstrap 90% interval over rounds (seed 0).
- target (issue 27): paged 8192 / contiguous 256 <= 1.3.

  python experiments/bench_paged.py [--batch 8] [--rounds 5] [--frames 8]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from flmjax.config import ModelConfig
from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.model import create
from flmjax.platforms import cpu_unless_accelerator

ARMS = {
  'contiguous 256': dict(max_len=256),
  'paged 8192': dict(max_len=8192, kv='paged', page_size=128),
  'contiguous 8192': dict(max_len=8192),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--warm', type=int, default=100, help='positions each session is in')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--frames', type=int, default=8, help='timed frames per arm per round')
  args = ap.parse_args()
  cfg = ModelConfig.small(dtype='float32', param_dtype='float32')
  model = create(cfg)
  B = args.batch
  total = args.warm + args.rounds * args.frames
  user = np.random.default_rng(0).integers(0, 2048, (total, B, 8)).astype(np.int32)
  decs, states = {}, {}
  for name, kw in ARMS.items():
    if kw.get('kv') == 'paged':
      kw = {**kw, 'pages': B * kw['max_len'] // kw['page_size']}
    dec = decs[name] = StreamingDecoder(model, SamplingConfig(), **kw)
    state = dec.init(B)
    t = time.perf_counter()
    for u in user[: args.warm]:
      state, out, _ = dec.step(state, u)
    np.asarray(out)
    states[name] = state
    print(f'{name}: {args.warm} warm frames (compiles included) in {time.perf_counter() - t:.1f} s')
  times = {name: [] for name in ARMS}  # [rounds][frames]
  for r in range(args.rounds):
    for name, dec in decs.items():
      state, got = states[name], []
      for u in user[args.warm + r * args.frames : args.warm + (r + 1) * args.frames]:
        t = time.perf_counter()
        state, out, _ = dec.step(state, u)
        np.asarray(out)
        got.append(time.perf_counter() - t)
      states[name] = state
      times[name].append(got)
  dev = jax.devices()[0]
  print(
    f'\n{dev.platform} x{jax.device_count()}, {os.cpu_count()} cores, jax {jax.__version__}, '
    f'B={B}, sessions {args.warm} positions in; load average {os.getloadavg()[0]:.1f} (a shared '
    'box: others run beside this)\n'
  )
  rng = np.random.default_rng(0)
  arr = {n: np.asarray(t) * 1e3 for n, t in times.items()}  # [rounds, frames] ms
  base = arr['contiguous 256']
  print('| arm | median ms/frame | / contiguous 256 | 90% interval (bootstrap over rounds) |')
  print('|---|---|---|---|')
  for name, a in arr.items():
    ratio = np.median(a) / np.median(base)
    boots = []
    for _ in range(1000):
      pick = rng.integers(0, args.rounds, args.rounds)
      boots.append(np.median(a[pick]) / np.median(base[pick]))
    lo, hi = np.percentile(boots, [5, 95])
    print(f'| {name} | {np.median(a):.1f} | {ratio:.2f} | {lo:.2f}-{hi:.2f} |')


if __name__ == '__main__':
  cpu_unless_accelerator()
  main()

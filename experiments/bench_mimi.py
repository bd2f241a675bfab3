"""Mimi benchmark: streaming encode + decode per 80 ms frame at several batch sizes, and batch
encode throughput, for the full (released) config with random weights, float32.

  python experiments/bench_mimi.py                    # ours, and the official torch Mimi if found
  python experiments/bench_mimi.py --batches 1,8 --frames 25 --no-official

The official Mimi (moshi 0.2.13, `pip install --no-deps moshi==0.2.13` next to torch==2.13.0 and
einops) is optional. When present it gets the same random weights, its codes are compared with
ours, and both are timed in the same process, alternating rounds, so the ratio is fair on a
shared machine. Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from flmjax.codec import Mimi, MimiConfig
from flmjax.codec.base import FRAME_SIZE
from flmjax.codec.mimi_checkpoint import random_state_dict
from flmjax.platforms import cpu_unless_accelerator

FRAME = FRAME_SIZE  # samples per 80 ms frame


def official_mimi(state_dict):
  """The official MimiModel with our random weights, or None when moshi/torch are missing."""
  try:
    import torch
    from moshi.models import loaders
  except ImportError as e:
    print(f'(official Mimi not available: {e})')
    return None
  torch.set_grad_enabled(False)
  model = loaders.get_mimi(None, device='cpu', num_codebooks=8)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return model.eval()


def flops_per_frame(cfg: MimiConfig) -> float:
  """Matmul FLOPs of one session's streaming encode + decode of one 80 ms frame."""
  from flmjax.codec import seanet

  total, length = 0.0, cfg.frame_size
  for _, cin, cout, k, stride, _ in seanet.encoder_convs(cfg):
    length //= stride
    total += 2 * length * k * cin * cout
  length = cfg.resample_stride
  for _, cin, cout, k, stride, _ in seanet.decoder_convs(cfg):
    total += 2 * length * k * cin * cout  # a transposed conv: every input step times its kernel
    length *= stride
  D, F, S = cfg.dimension, cfg.dim_feedforward, cfg.resample_stride
  per_step = cfg.num_layers * 2 * (4 * D * D + 2 * D * F + 2 * cfg.context * D)
  total += 2 * S * per_step  # encoder and decoder transformers, S steps each
  total += 2 * S * D * D * 2  # down- and upsampling
  total += 2 * cfg.num_codebooks * cfg.quantizer_bins * cfg.quantizer_dimension
  return total


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
  """GFLOP/s of a jitted n^3 float32 matmul right now (the machine's share at this moment)."""
  a = jax.numpy.ones((n, n), jax.numpy.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / float(np.median(times)) / 1e9


def stream_ours(mimi: Mimi, pcm: np.ndarray):
  """pcm [B, F*1920] -> per-frame seconds [F], per-frame process CPU seconds [F] (all threads:
  less sensitive than wall time to other jobs on a shared machine), codes [B,8,F]."""
  state = mimi.init_stream(pcm.shape[0])
  times, cpu, codes = [], [], []
  for f in range(pcm.shape[1] // FRAME):
    t, c0 = time.perf_counter(), time.process_time()
    state, c = mimi.encode_step(state, pcm[:, f * FRAME : (f + 1) * FRAME])
    state, y = mimi.decode_step(state, c)
    y.block_until_ready()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c0)
    codes.append(np.asarray(c))
  return np.array(times), np.array(cpu), np.stack(codes, -1)


def stream_official(model, pcm: np.ndarray):
  import torch

  times, codes = [], []
  with model.streaming(pcm.shape[0]):
    for f in range(pcm.shape[1] // FRAME):
      x = torch.from_numpy(pcm[:, None, f * FRAME : (f + 1) * FRAME])
      t = time.perf_counter()
      c = model.encode(x)
      model.decode(c)
      times.append(time.perf_counter() - t)
      codes.append(c[:, :, 0].numpy())
  return np.array(times), np.stack(codes, -1)


def best_torch_threads(model, pcm: np.ndarray) -> int:
  """Sets and returns torch's faster intra-op thread count (1 or all cores) on a few frames: on a
  loaded machine torch's spinning OpenMP threads can be many times slower than one thread."""
  import torch

  best = None
  for n in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(n)
    t = float(np.median(stream_official(model, pcm)[0][1:]))
    if best is None or t < best[0]:
      best = (t, n)
  torch.set_num_threads(best[1])
  return best[1]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--batches', default='1,8')
  ap.add_argument('--frames', type=int, default=25, help='timed frames per streaming round')
  ap.add_argument('--rounds', type=int, default=3, help='alternating ours/official rounds')
  ap.add_argument('--encode-seconds', type=float, default=10.0, help='audio per batch-encode row')
  ap.add_argument('--encode-batch', type=int, default=4)
  ap.add_argument('--no-official', action='store_true')
  args = ap.parse_args()

  cfg = MimiConfig.full()
  state_dict = random_state_dict(cfg, seed=0)
  ours = Mimi.random(cfg, seed=0)
  official = None if args.no_official else official_mimi(state_dict)
  rng = np.random.default_rng(0)
  print(
    f'# Mimi full config, float32, {platform.processor() or platform.machine()}, '
    f'jax {jax.__version__}, {jax.devices()[0].platform}'
  )
  rows = []
  for batch in map(int, args.batches.split(',')):
    warm = 3  # frames that compile / warm up, not timed
    pcm = (0.1 * rng.standard_normal((batch, (args.frames + warm) * FRAME))).astype(np.float32)
    t = time.perf_counter()
    stream_ours(ours, pcm[:, :FRAME])
    compile_s = time.perf_counter() - t
    ours_t, ours_cpu, off_t, agree, threads = [], [], [], None, None
    if official is not None:
      threads = best_torch_threads(official, pcm[:, : 4 * FRAME])
    for _ in range(args.rounds):
      times, cpu, codes = stream_ours(ours, pcm)
      ours_t.append(times[warm:])
      ours_cpu.append(cpu[warm:])
      if official is not None:
        times, ref = stream_official(official, pcm)
        off_t.append(times[warm:])
        agree = float((codes == ref).mean())
    peak = matmul_gflops()
    ours_ms = 1e3 * float(np.median(np.concatenate(ours_t)))
    cpu_ms = 1e3 * float(np.median(np.concatenate(ours_cpu)))
    achieved = batch * flops_per_frame(cfg) / (ours_ms / 1e3) / 1e9
    off_ms = 1e3 * float(np.median(np.concatenate(off_t))) if off_t else None
    rows.append(
      (
        f'stream B={batch}',
        f'{ours_ms:.1f} ms/frame',
        f'{off_ms:.1f} ms/frame' if off_ms else '-',
        f'{off_ms / ours_ms:.2f}x' if off_ms else '-',
        f'{achieved:.0f} GFLOP/s of a {peak:.0f} GFLOP/s matmul now; '
        f'CPU time {cpu_ms:.1f} ms/frame; compile {compile_s:.1f} s'
        + (f'; codes agree {agree:.4f}; torch threads {threads}' if agree is not None else ''),
      )
    )

  # Batch encode throughput (seconds of audio per second of wall time).
  n = int(args.encode_seconds * cfg.sample_rate) // FRAME * FRAME
  pcm = (0.1 * rng.standard_normal((args.encode_batch, n))).astype(np.float32)
  ours.encode(pcm).block_until_ready()
  ours_s, off_s = [], []
  for _ in range(args.rounds):
    t = time.perf_counter()
    ours.encode(pcm).block_until_ready()
    ours_s.append(time.perf_counter() - t)
    if official is not None:
      import torch

      t = time.perf_counter()
      official.encode(torch.from_numpy(pcm[:, None]))
      off_s.append(time.perf_counter() - t)
  audio = pcm.size / cfg.sample_rate
  ours_x = audio / float(np.median(ours_s))
  off_x = audio / float(np.median(off_s)) if off_s else None
  rows.append(
    (
      f'batch encode {args.encode_batch}x{args.encode_seconds:.0f}s',
      f'{ours_x:.1f} s audio/s',
      f'{off_x:.1f} s audio/s' if off_x else '-',
      f'{ours_x / off_x:.2f}x' if off_x else '-',
      '',
    )
  )

  print('| what | flmjax (JAX) | official (torch) | speed-up | notes |')
  print('|---|---|---|---|---|')
  for row in rows:
    print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()

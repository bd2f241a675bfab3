"""Data pipeline throughput vs. the tiny model's training-step consumption (CPU).

Prints: synthetic corpus generation + prepare time, grain frames/s at the tiny training batch shape
(batch 16 x window 64 columns), and the frames/s the real tiny-model training step (flmjax.train,
fed by this pipeline) consumes at the same shape. The pipeline must be faster than the step.

  .venv/bin/python experiments/bench_data.py [--batches 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def bench_loader(cfg, specs, batch, window, batches, threads):
  from flmjax.data.grid import LossWeights
  from flmjax.data.pipeline import make_loader

  it = make_loader(
    cfg,
    specs,
    window=window,
    batch_size=batch,
    seed=0,
    loss_weights=LossWeights(),
    shard_index=0,
    shard_count=1,
    num_threads=threads,
  )
  for _ in range(10):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t
  return batches * batch * window / dt, dt / batches


def bench_train_step(cfg, specs, batch, window, steps):
  """The real training step (flmjax.train) fed by the real pipeline: frames/s of the loop."""
  import jax
  import jax.numpy as jnp
  from bench_common import global_batch, train_setup

  from flmjax.train import step as sp
  from flmjax.train.config import StageConfig

  stage = StageConfig('bench', steps, sources=tuple(specs))
  tc, mesh, spec, state, loader = train_setup(
    cfg, batch, window, stage, run_dir=tempfile.mkdtemp(), compute_dtype='float32'
  )
  step = sp.jit_train_step(spec, tc, mesh)
  lr = jnp.float32(1e-3)
  state, metrics = step(state, global_batch(loader, mesh), lr)  # compile
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, global_batch(loader, mesh), lr)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - t) / steps
  return batch * (window - 1) / dt, dt


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--window', type=int, default=64)
  p.add_argument('--batches', type=int, default=300)
  p.add_argument('--threads', type=int, nargs='+', default=[1, 2, 4])
  p.add_argument('--steps', type=int, default=30)
  args = p.parse_args()
  from flmjax.config import ModelConfig
  from flmjax.data import synthetic
  from flmjax.data.pipeline import SourceSpec
  from flmjax.data.prepare import prepare
  from flmjax.data.tokenizer import load_tokenizer

  cfg = ModelConfig.tiny()
  print(f'machine: {os.cpu_count()} CPUs')
  with tempfile.TemporaryDirectory() as root:
    t = time.perf_counter()
    paths = synthetic.generate(os.path.join(root, 'syn'))
    t_gen = time.perf_counter() - t
    tok = load_tokenizer(paths['tokenizer'])
    t = time.perf_counter()
    for name in ('tts_asr', 'duplex'):
      prepare(paths[name], os.path.join(root, name), tok, progress=False, strict=True)
    t_prep = time.perf_counter() - t
    print(f'synthetic corpus: generate {t_gen:.2f} s, prepare {t_prep:.2f} s')
    specs = [
      SourceSpec(os.path.join(root, 'tts_asr'), layout='mixed', offset_frames=1),
      SourceSpec(os.path.join(root, 'duplex'), offset_frames=1),
    ]
    for threads in args.threads:
      fps, per = bench_loader(cfg, specs, args.batch, args.window, args.batches, threads)
      print(
        f'grain pipeline ({threads} threads): {fps:,.0f} frames/s '
        f'({per * 1e3:.2f} ms per batch of {args.batch}x{args.window})'
      )
    fps, per = bench_train_step(cfg, specs, args.batch, args.window, args.steps)
  print(
    f'tiny training loop (flmjax.train step fed by this pipeline): {fps:,.0f} frames/s '
    f'({per * 1e3:.1f} ms per step)'
  )


if __name__ == '__main__':
  main()

"""Data pipeline throughput vs. the tiny model's training-step consumption (CPU).

Prints: synthetic corpus generation + prepare time, grain frames/s at the tiny training batch shape
(batch 16 x window 64 columns), and the frames/s a jitted tiny-model train step (forward, backward,
Adam) consumes at the same shape. The pipeline must be faster than the step.

  .venv/bin/python experiments/bench_data.py [--batches 300] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def bench_loader(cfg, specs, batch, window, batches, threads):
  from flmjax.data.grid import LossWeights
  from flmjax.data.pipeline import make_loader
  it = make_loader(cfg, specs, window=window, batch_size=batch, seed=0, loss_weights=LossWeights(),
                   shard_index=0, shard_count=1, num_threads=threads)
  for _ in range(10):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t
  return batches * batch * window / dt, dt / batches


def bench_train_step(cfg, batch, window, steps):
  """Proxy of the training step: CE on text + 8 speak codebooks, weighted, Adam update."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from flmjax.model import flm
  model = flm.create(cfg, 0)
  graphdef, params = nnx.split(model, nnx.Param)
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  k = cfg.num_codebooks

  def loss_fn(params, tokens, weights):
    m = nnx.merge(graphdef, params)
    x, y, w = tokens[:, :, :-1], tokens[:, :, 1:], weights[:, :, 1:]  # [B, 17, T]
    speak_next = jnp.moveaxis(y[:, 1:1 + k], 1, 2)  # [B, T, 8]
    out = m(x[:, 0], jnp.moveaxis(x[:, 1:1 + k], 1, 2), jnp.moveaxis(x[:, 1 + k:], 1, 2),
            speak_next[..., :k - 1])
    text_ce = optax.softmax_cross_entropy_with_integer_labels(out.text_logits, y[:, 0])  # [B, T]
    depth_ce = optax.softmax_cross_entropy_with_integer_labels(out.depth_logits, speak_next)
    total = (text_ce * w[:, 0]).sum() + (depth_ce * jnp.moveaxis(w[:, 1:1 + k], 1, 2)).sum()
    return total / jnp.maximum(w.sum(), 1.0)

  @jax.jit
  def step(params, opt_state, tokens, weights):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, weights)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 300, (batch, cfg.num_channels, window + 1)), jnp.int32)
  weights = jnp.ones((batch, cfg.num_channels, window + 1), jnp.float32)
  params, opt_state, loss = step(params, opt_state, tokens, weights)
  loss.block_until_ready()
  t = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, tokens, weights)
  loss.block_until_ready()
  dt = (time.perf_counter() - t) / steps
  return batch * window / dt, dt


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
    specs = [SourceSpec(os.path.join(root, 'tts_asr'), layout='mixed', offset_frames=1),
             SourceSpec(os.path.join(root, 'duplex'), offset_frames=1)]
    for threads in args.threads:
      fps, per = bench_loader(cfg, specs, args.batch, args.window, args.batches, threads)
      print(f'grain pipeline ({threads} threads): {fps:,.0f} frames/s '
            f'({per * 1e3:.2f} ms per batch of {args.batch}x{args.window})')
  fps, per = bench_train_step(cfg, args.batch, args.window, args.steps)
  print(f'tiny train step (jit, fwd+bwd+adam): {fps:,.0f} frames/s ({per * 1e3:.1f} ms per step)')


if __name__ == '__main__':
  main()

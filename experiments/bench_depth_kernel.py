"""Times one greedy depth frame (C steps x L layers with the KV cache): XLA reference vs Pallas.

One call does everything: measures the accelerator's memory read bandwidth, builds a random
DepthTransformer (flm_8b depth shapes in bf16 by default: dim 1024, 16 heads of 64, 6 layers,
8 codebooks, MLP 2730), and for each batch size times the frame with the reference layer_step and
with the platform's Pallas kernel (GPU: the Triton kernels, sweeping a few tilings; TPU: the Mosaic
kernel), next to the weight-read floor (weight bytes a frame must read / measured bandwidth).
Writes a markdown table to stdout and, with --out, to a file.

  python experiments/bench_depth_kernel.py --out results.md       # on a GPU or TPU
  python experiments/bench_depth_kernel.py --cpu                  # CPU smoke run (interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import depth_weight_bytes, read_bandwidth, timed  # noqa: E402
from flax import nnx  # noqa: E402

from flmjax.config import ModelConfig  # noqa: E402
from flmjax.kernels import depth_step, reference  # noqa: E402
from flmjax.model import depth as depth_lib  # noqa: E402
from flmjax.platforms import cpu_unless_accelerator  # noqa: E402

# Triton tilings tried per batch size (the fastest is reported): nb sets how many CTAs share a
# weight matrix (d / nb for the projections), kb the reduction step.
GPU_TILES = [
  dict(kb=64, nb=32, num_warps=4),
  dict(kb=128, nb=16, num_warps=4),
  dict(kb=64, nb=64, num_warps=4),
  dict(kb=64, nb=32, num_warps=4, fuse_attention=True),
]


def make_frame(graphdef, fns: dict, frames: int):
  """jit(state, cond, cache) -> codes of `frames` back-to-back frames (one dispatch).

  fns: {'layer_fn': ...} (per layer, under the model's layer scan) or {'layers_fn': ...} (the
  whole stack, stacked weights read in place)."""

  @jax.jit
  def run(state, cond, cache):
    depth = nnx.merge(graphdef, state)

    def one(carry, _):
      codes, cache = reference.depth_frame(depth, cond, carry, **fns)
      return cache, codes

    _, codes = jax.lax.scan(one, cache, None, length=frames)
    return codes

  return run


def bench_batch(cfg, graphdef, state, b, variants, frames, iters, seed=0):
  rng = np.random.default_rng(seed + b)
  cond = jnp.asarray(rng.standard_normal((b, cfg.num_codebooks, cfg.depth_dim)), cfg.compute_dtype)
  cache = depth_lib.init_cache(cfg, b)
  results = {}
  for name, fns in variants:
    run = make_frame(graphdef, fns, frames)
    try:
      codes = jax.block_until_ready(run(state, cond, cache))  # compile + warm up
      step = functools.partial(run, state, cond, cache)
      ms = timed(step, repeats=iters) / frames * 1e3
      results[name] = (ms, np.asarray(codes))
    except Exception as e:  # a tiling Triton rejects must not sink the whole run
      print(f'  B={b} {name}: failed: {type(e).__name__}: {str(e)[:300]}', flush=True)
    else:
      print(f'  B={b} {name}: {ms:.3f} ms/frame', flush=True)
  return results


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument(
    '--cpu', action='store_true', help='smoke run on CPU: small shapes, kernels in interpret mode'
  )
  ap.add_argument('--batches', default=None, help='comma-separated batch sizes (1,8,32,128)')
  ap.add_argument('--frames', type=int, default=None, help='frames per timed dispatch')
  ap.add_argument('--iters', type=int, default=None, help='timed repeats (the best is kept)')
  ap.add_argument('--no-sweep', action='store_true', help='GPU: one tiling instead of a sweep')
  ap.add_argument('--out', default=None, help='also write the markdown table here')
  args = ap.parse_args(argv)

  backend = jax.default_backend()
  if args.cpu:
    cfg = ModelConfig.small(dtype='bfloat16', param_dtype='bfloat16')
    batches, frames, iters = [1, 8], args.frames or 1, args.iters or 2
    kernels = [
      ('tpu-kernel stacked (interpret)', 'stack', dict(kernel='tpu', interpret=True)),
      ('gpu-kernels stacked (interpret)', 'stack', dict(kernel='gpu', interpret=True)),
      ('gpu-kernels per-layer (interpret)', 'layer', dict(kernel='gpu', interpret=True)),
    ]
    bw_bytes = 256 << 20
  elif backend == 'cpu':
    print('no accelerator found: run with --cpu for the interpret-mode smoke run', file=sys.stderr)
    return 2
  else:
    cfg = ModelConfig.flm_8b()
    batches, frames, iters = [1, 8, 32, 128], args.frames or 10, args.iters or 5
    tiles = [{}] if backend == 'tpu' else GPU_TILES[:1] if args.no_sweep else GPU_TILES
    label = lambda t: ','.join(f'{k}={v}' for k, v in t.items())
    # The per-layer entry (the decoder's layer_fn) once, the stacked entry for every tiling.
    kernels = [(f'per-layer {label(tiles[0])}', 'layer', tiles[0])]
    kernels += [(f'stacked {label(t)}', 'stack', t) for t in tiles]
    bw_bytes = 2 << 30
  if args.batches:
    batches = [int(b) for b in args.batches.split(',')]

  device = jax.devices()[0]
  print(f'device: {device.device_kind} ({backend}), jax {jax.__version__}', flush=True)
  bw = read_bandwidth(bw_bytes, 5)
  wb = depth_weight_bytes(cfg)
  print(
    f'measured read bandwidth: {bw / 1e9:.0f} GB/s; depth weights per frame: '
    f'{wb["once"] / 1e6:.0f} MB once, {wb["per_step"] / 1e6:.0f} MB re-reading qkv/proj',
    flush=True,
  )
  depth = nnx.eval_shape(lambda: depth_lib.DepthTransformer(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, _ = nnx.split(depth)
  state = jax.jit(lambda: nnx.split(depth_lib.DepthTransformer(cfg, rngs=nnx.Rngs(params=0)))[1])()

  variants = [('xla', {'layer_fn': depth_lib.layer_step})]
  variants += [
    (
      name,
      {'layer_fn': depth_step.select_depth_layer_fn(**kw)}
      if entry == 'layer'
      else {'layers_fn': depth_step.select_depth_layers_fn(**kw)},
    )
    for name, entry, kw in kernels
  ]
  d = cfg
  header = [
    f'Depth frame ({d.num_codebooks} steps x {d.depth_layers} layers, dim {d.depth_dim}, '
    f'{d.depth_heads} heads, MLP {d.depth_mlp_dim}, {d.dtype}) on {device.device_kind}, '
    f'jax {jax.__version__}; read bandwidth {bw / 1e9:.0f} GB/s; ms per frame, best of {iters} '
    f'runs of {frames} frames.'
    + (' CPU smoke run: interpret mode, times mean nothing.' if args.cpu else ''),
    '',
    '| B | XLA ms | Pallas ms | speedup | floor ms (weights once) | floor ms (qkv/proj per step) '
    '| codes equal to XLA | best Pallas variant |',
    '|---|---|---|---|---|---|---|---|',
  ]
  rows, every = [], []
  for b in batches:
    res = bench_batch(cfg, graphdef, state, b, variants, frames, iters)
    xla_ms, xla_codes = res.get('xla', (float('nan'), None))
    for name, (ms, codes) in res.items():
      same = '-' if xla_codes is None else f'{np.mean(codes == xla_codes):.3f}'
      every.append(f'| {b} | {name} | {ms:.3f} | {same} |')
    res.pop('xla', None)
    best = min(res.items(), key=lambda kv: kv[1][0]) if res else None
    floor = (wb['once'] / bw * 1e3, wb['per_step'] / bw * 1e3)
    if best and xla_codes is not None:
      name, (ms, codes) = best
      agree = float(np.mean(codes == xla_codes))
      rows.append(
        f'| {b} | {xla_ms:.3f} | {ms:.3f} | {xla_ms / ms:.2f}x | {floor[0]:.3f} | '
        f'{floor[1]:.3f} | {agree:.3f} | {name} |'
      )
    else:
      rows.append(
        f'| {b} | {xla_ms:.3f} | {best[1][0] if best else float("nan"):.3f} | - | '
        f'{floor[0]:.3f} | {floor[1]:.3f} | - | {best[0] if best else "failed"} |'
      )
    # Written after every batch size, so a run cut short still leaves its table.
    table = '\n'.join(
      header
      + rows
      + ['', '| B | variant | ms per frame | codes equal to XLA |', '|---|---|---|---|']
      + every
    )
    if args.out:
      with open(args.out, 'w') as f:
        f.write(table + '\n')
  print('\n' + table)
  return 0


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  sys.exit(main())

"""The depth kernels' tests, compiled for the accelerator (not interpreted): kernel vs reference.

tests/test_kernels_*.py run the kernels in Pallas interpret mode on 8 simulated CPU devices;
this runs the same checks on a real GPU (the Triton kernels) or TPU (the Mosaic kernel):
- one layer (select_depth_layer_fn) and the whole stack (select_depth_layers_fn, 2 layers) at the
  tiny dims, a non-power-of-two case and flm_8b's, B in --batches, positions c = 0 and C-1,
  float32 and bfloat16, with the tests' tolerances: float32 max|kernel - ref| / max|ref| < 1e-5;
  bfloat16 ||kernel - ref|| / ||ref|| < 2e-2 and elementwise < 5e-2; every cache row other than
  c bit-identical;
- greedy decoding of the golden tiny stream with StreamingDecoder(use_pallas=True): the official
  out_plain, token for token;
- JAX's paged-attention kernel (the platform's: jax.experimental.pallas.ops.gpu.paged_attention
  on a GPU, .tpu on a TPU; the GPU one with --interpret) through flmjax.model.paged.attend_kernel
  against the XLA path (attend_xla) on ragged sessions at the tiny dims and flm_8b's (28 query
  heads, 4 KV heads, head dim 128, pages of 128): float32 (max error / max|ref| < 1e-5; the TPU
  kernel loads pages as bfloat16, so there 2e-2), bfloat16 and int8 pages (the bfloat16
  metric), and the golden greedy stream through it (kv='paged', paged_impl 'kernel').
Prints a markdown table; exits 1 when a check fails.

  python experiments/gpu_kernel_check.py                 # on a GPU or TPU
  python experiments/gpu_kernel_check.py --interpret     # CPU smoke run (interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = {'float32': 1e-5, 'bfloat16': 2e-2}
BF16_ELEMENTWISE = 5e-2
EPS, C = 1e-6, 8
DIMS = {'tiny': (32, 4, 85), 'odd': (40, 4, 106), 'flm_8b': (1024, 16, 2816)}  # (d, heads, f)


def random_layer(rng, b, dims, dtype, layers=None):
  d, h, f = dims
  lead = () if layers is None else (layers,)
  n = lambda shape, scale: jnp.asarray(scale * rng.standard_normal(lead + shape, np.float32), dtype)
  p = {
    'ln_1': 1 + n((d,), 0.1),
    'qkv': n((3, d, d), d**-0.5),
    'proj': n((h, d // h, d), d**-0.5),
    'ln_2': 1 + n((d,), 0.1),
    'gate': n((C, d, f), d**-0.5),
    'up': n((C, d, f), d**-0.5),
    'down': n((C, f, d), f**-0.5),
  }
  cache = lambda: jnp.asarray(rng.standard_normal(lead + (b, C, h, d // h), np.float32), dtype)
  return p, jnp.asarray(rng.standard_normal((b, d), np.float32), dtype), cache(), cache()


def errors(want, got, dtype) -> float:
  """The tests' metric: elementwise for float32; the worse of norm-wise / 2e-2 and elementwise /
  5e-2 (scaled to the 2e-2 tolerance) for bfloat16."""
  want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
  elem = float(np.max(np.abs(want - got)) / np.max(np.abs(want)))
  if dtype == 'float32':
    return elem
  norm = float(np.linalg.norm(want - got) / np.linalg.norm(want))
  return max(norm, elem * TOL['bfloat16'] / BF16_ELEMENTWISE)


def check_layers(args, rows):
  from flmjax.kernels.depth_step import select_depth_layer_fn, select_depth_layers_fn
  from flmjax.kernels.reference import depth_layer_step, depth_layers_step

  rng = np.random.default_rng(0)
  for stacked in (False, True):
    ref = jax.jit(functools.partial(depth_layers_step if stacked else depth_layer_step, eps=EPS))
    select = select_depth_layers_fn if stacked else select_depth_layer_fn
    kern = jax.jit(functools.partial(select(interpret=args.interpret), eps=EPS))
    for name, dims in DIMS.items():
      if args.interpret and name == 'flm_8b':
        continue  # interpret mode at flm_8b dims takes minutes on a CPU
      for dtype in ('float32', 'bfloat16'):
        worst, same = 0.0, True
        for b in args.batches:
          p, x, k, v = random_layer(rng, b, dims, jnp.dtype(dtype), 2 if stacked else None)
          for c in (0, C - 1):
            want, got = ref(p, x, k, v, jnp.int32(c)), kern(p, x, k, v, jnp.int32(c))
            at = (slice(None),) * (1 + stacked) + (c,)
            worst = max(
              [worst, errors(want[0], got[0], dtype)]
              + [errors(w[at], g[at], dtype) for w, g in zip(want[1:], got[1:])]
            )
            others = (slice(None),) * (1 + stacked) + (np.arange(C) != c,)
            for w, g in zip(want[1:], got[1:]):
              same &= bool(np.array_equal(np.asarray(w)[others], np.asarray(g)[others]))
        ok = worst < TOL[dtype] and same
        rows.append(
          (
            f'{"stack" if stacked else "layer"} {name} {dtype}',
            f'B={",".join(map(str, args.batches))}',
            f'{worst:.2e}',
            f'< {TOL[dtype]:g}',
            'pass' if ok else 'FAIL',
          )
        )


def check_stream(rows, name: str, **decoder):
  """The golden greedy stream through a StreamingDecoder built with `decoder`'s options."""
  import flmjax
  from flmjax.decode import SamplingConfig, StreamingDecoder

  golden = ROOT / 'tests' / 'golden' / 'flm_tiny'
  stream = np.load(golden / 'stream.npz')
  greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  dec = StreamingDecoder(
    flmjax.load_official(str(golden), dtype='float32'), greedy, max_len=32, **decoder
  )
  state, outs = dec.init(1), []
  for frame in np.transpose(stream['user'], (2, 0, 1)):
    state, out, valid = dec.step(state, frame)
    outs.append(np.where(np.asarray(valid)[:, None], np.asarray(out), -1)[0])
  wrong = int(np.sum(np.stack(outs) != stream['out_plain']))
  rows.append(
    (
      f'golden greedy stream, {name}',
      '24 frames',
      f'{wrong} tokens differ',
      '0',
      'pass' if wrong == 0 else 'FAIL',
    )
  )


PAGED = {'tiny': (4, 2, 16, 16), 'flm_8b': (28, 4, 128, 128)}  # (q heads, KV heads, H, page)


def check_paged(args, rows):
  from flmjax.model import paged as pg

  kind = 'tpu' if jax.default_backend() == 'tpu' else 'gpu'
  rng = np.random.default_rng(0)
  for name, (n, kv, h, page) in PAGED.items():
    b, m = 8, 16  # 8 sessions of up to 16 pages, in a pool of 2 layers x 64 pages
    pool32 = {x: rng.standard_normal((kv, 128, page, h), np.float32) for x in ('k', 'v')}
    q32 = rng.standard_normal((b, 1, n, h), np.float32)
    if args.interpret and name == 'flm_8b':
      continue  # interpret mode at flm_8b dims takes minutes on a CPU
    table = jnp.asarray(rng.integers(0, 64, (b, m)) + 64, jnp.int32)  # layer 1's pages
    count = jnp.asarray(rng.integers(1, m * page + 1, b), jnp.int32)
    for dtype in ('float32', 'bfloat16', 'int8'):
      cast = jnp.float32 if dtype == 'float32' else jnp.bfloat16
      q = jnp.asarray(q32, cast)
      pool = {x: jnp.asarray(v, cast) for x, v in pool32.items()}
      if dtype == 'int8':
        for x in ('k', 'v'):
          pool[x], pool[f'{x}_scale'] = pg.quantize(jnp.asarray(pool32[x]))
      run = lambda *a: pg.attend_kernel(*a, kind=kind, interpret=args.interpret)
      got = jax.jit(run)(q, pool, table, count)
      want = jax.jit(pg.attend_xla)(q, pool, table, count)
      metric = 'float32' if dtype == 'float32' else 'bfloat16'
      tol = TOL['bfloat16'] if kind == 'tpu' else TOL[metric]
      worst = errors(want, got, metric)
      rows.append(
        (
          f'paged attention ({kind}) {name} {dtype}',
          f'B={b}, {m} pages of {page}',
          f'{worst:.2e}',
          f'< {tol:g}',
          'pass' if worst < tol else 'FAIL',
        )
      )


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--batches', default='1,3,8', help='comma-separated batch sizes')
  ap.add_argument('--interpret', action='store_true', help='Pallas interpret mode (CPU smoke)')
  args = ap.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(',')]
  if not args.interpret and jax.default_backend() == 'cpu':
    print('gpu_kernel_check: no GPU or TPU visible (use --interpret on CPU)', file=sys.stderr)
    return 1
  rows = []
  check_layers(args, rows)
  check_stream(rows, 'use_pallas', use_pallas=True, pallas_interpret=args.interpret)
  check_paged(args, rows)
  if jax.default_backend() != 'tpu':  # the TPU kernel's bfloat16 pages: see docs/decoding.md
    paged_impl = 'gpu_interpret' if args.interpret else 'kernel'
    # Triton's dots want blocks of at least 16 positions.
    check_stream(rows, 'paged kernel', kv='paged', pages=2, page_size=16, paged_impl=paged_impl)
  mode = 'interpret mode' if args.interpret else 'compiled'
  print(
    f'\n| kernel check ({jax.devices()[0].device_kind}, {mode}) | shapes | max error | '
    f'tolerance | result |\n|---|---|---|---|---|'
  )
  for row in rows:
    print('| ' + ' | '.join(row) + ' |')
  return 0 if all(r[-1] == 'pass' for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())

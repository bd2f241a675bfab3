"""Causal attention and the text loss: the memory-efficient paths against the plain ones.

For attention (flmjax/model/attention.py) at flm_8b's shapes (28 query heads, 4 KV heads, head
dim 128), forward + backward of sum(out * cotangent):
  - error of each path against the plain path run in float32 on the same inputs;
  - temporary bytes of the compiled program (XLA's memory_analysis) and the time per call.
Paths: plain (the [B,K,G,T,S] float32 scores), chunked, and on GPU cudnn
(jax.nn.dot_product_attention), on TPU splash.
For the text loss (flmjax/model/loss.py), --loss compares the compiled temporaries of the plain
log-softmax over [B,T,V] with the blocked one, forward + backward, at flm_8b's vocab.

  python experiments/bench_attention.py [--window 4096] [--batch 1] [--loss]

Runs with jax and numpy alone (the GPU image has no flax): flmjax's package __init__ and the
sharding module (used by splash only, for its mesh) are stubbed when flax is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_common import timed  # noqa: E402

if importlib.util.find_spec('flax') is None:  # load flmjax.model.attention without the package
  for name in ('flmjax', 'flmjax.model'):
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(ROOT, *name.split('.'))]
    sys.modules[name] = pkg
  sys.modules['flmjax.sharding'] = types.ModuleType('flmjax.sharding')
  sys.modules['flmjax'].sharding = sys.modules['flmjax.sharding']
from flmjax.model import attention  # noqa: E402
from flmjax.platforms import cpu_unless_accelerator  # noqa: E402


def temp_bytes(fn, *args) -> int:
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def attention_rows(b: int, t: int, dtype, paths, compile_only: bool = False) -> list[str]:
  n, k, h = 28, 4, 128
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
  kk = jax.random.normal(keys[1], (b, t, k, h), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, k, h), jnp.float32)
  cot = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)

  def fwd_bwd(f):
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  args = tuple(x.astype(dtype) for x in (q, kk, v))
  rows = []
  if compile_only:
    for name in paths:
      f = lambda q, k, v, name=name: attention.causal_attention(q, k, v, impl=name)
      mem = temp_bytes(fwd_bwd(f), *args) / 2**20
      rows.append(f'| {name} | {jnp.dtype(dtype).name} | {b}x{t} | | | {mem:.0f} | |')
    return rows
  ref_val, ref_grads = fwd_bwd(attention.plain)(q, kk, v)
  ref_out = jax.jit(attention.plain)(q, kk, v)
  for name in paths:
    f = lambda q, k, v, name=name: attention.causal_attention(q, k, v, impl=name)
    try:
      step = fwd_bwd(f)
      out = jax.jit(f)(*args).astype(jnp.float32)
      _, grads = step(*args)
    except Exception as e:  # a path this platform cannot run: say so and go on
      rows.append(
        f'| {name} | {jnp.dtype(dtype).name} | {b}x{t} | failed: '
        f'{type(e).__name__}: {str(e).splitlines()[0][:80]} | | | |'
      )
      continue
    err = float(jnp.max(jnp.abs(out - ref_out)))
    gerr = max(
      float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
      for g, r in zip(grads, ref_grads)
    )
    mem = temp_bytes(step, *args) / 2**20
    ms = timed(step, *args) * 1e3
    label = 'cudnn (float32 runs chunked)' if name == 'cudnn' and dtype == jnp.float32 else name
    rows.append(
      f'| {label} | {jnp.dtype(dtype).name} | {b}x{t} | {err:.2e} | {gerr:.2e} | '
      f'{mem:.0f} | {ms:.2f} |'
    )
  return rows


def loss_rows(b: int, t: int) -> list[str]:
  """The text loss's temporaries: the plain [B,T,V] log-softmax vs blocks of 256 columns."""
  from flax import nnx

  from flmjax.config import ModelConfig
  from flmjax.model import loss as loss_lib
  from flmjax.model.backbone import Backbone

  cfg = ModelConfig.flm_8b(num_layers=1, dtype='bfloat16', param_dtype='float32')
  bb = nnx.eval_shape(lambda: Backbone(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(bb)
  h = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.bfloat16)
  tgt = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def plain(state, h, tgt):
    logits = nnx.merge(graphdef, state).text_logits(h, padded=True).astype(jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1)
    return jnp.sum(ce)

  def blocked(state, h, tgt):
    return jnp.sum(loss_lib.text_cross_entropy(nnx.merge(graphdef, state), h, tgt)[0])

  rows = []
  for name, f in (('plain', plain), ('blocked (256 columns)', blocked)):
    step = jax.jit(jax.grad(f, argnums=(0, 1)))
    mem = temp_bytes(step, state, h, tgt) / 2**30
    rows.append(f'| {name} | {b}x{t} | V {cfg.padded_vocab_size} | {mem:.2f} GiB |')
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--window', type=int, default=4096)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--loss', action='store_true', help='also the text loss (needs flax)')
  ap.add_argument(
    '--compile-only',
    action='store_true',
    help='temporaries only: no runs (for CPU hosts, where plain takes minutes)',
  )
  args = ap.parse_args()
  platform = attention.platform()
  fast = {'gpu': ['cudnn'], 'tpu': ['splash']}.get(platform, [])
  print(
    f'{jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}; window '
    f'{args.window} (T = {args.window - 1}), batch {args.batch}, 28/4 heads of 128; '
    'forward + backward; errors against plain in float32 (output: max abs; grads: max abs '
    'over max |ref|)'
  )
  print('| path | dtype | BxT | out err | grad err | temp MiB | ms |')
  print('|---|---|---|---|---|---|---|')
  t = args.window - 1
  for dtype in (jnp.float32, jnp.bfloat16):
    for row in attention_rows(args.batch, t, dtype, ['plain', 'chunked'] + fast, args.compile_only):
      print(row, flush=True)
  if args.loss:
    print('\n| text loss | BxT | vocab | temp |\n|---|---|---|---|')
    for row in loss_rows(args.batch, t):
      print(row, flush=True)


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()

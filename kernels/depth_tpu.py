"""Fused depth step for TPU (Mosaic): one pallas_call per layer, or one for the whole stack.

The grid (layers, phases) is sequential, so every weight tile is streamed through VMEM once while
the Pallas pipeline prefetches the next one (across layer boundaries too). Per layer:
  steps 0..nH-1         head block i: q/k/v for its heads, attention over the C cached positions,
                        and its share of the output projection (accumulated in f32);
  step nH-1 (end)       x1 = x + attn, then RMSNorm 2;
  steps nH..nH+nF-1     MLP tile j of codebook c (picked by the scalar-prefetched c in the index
                        maps): down(silu(gate y) * up y) accumulated in f32;
  last step (end)       x2 = x1 + mlp, carried in VMEM to the next layer.
Index maps clamp outside their phase, so a block index repeats and is not fetched again. Weights
and caches are always stacked [L,...] (one layer is L = 1), and the layer is a block index. The
weights are read in the model's own layout (qkv [L,3,d,n], proj [L,h,e,d], gate/up [L,C,d,f],
down [L,C,f,d] with f padded to whole 128-lane tiles), which TPUs store row-major: the compiled
program copies no weight before the call (tests/test_kernels_tpu_compile.py).
Shape letters as in flmjax/model/layers.py (B: the rows); `l` is a lane block of hb heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flmjax.kernels.common import write_rows
from flmjax.model.layers import NEG_INF as _NEG_INF  # the model's own mask value
from flmjax.model.layers import rms_norm  # the model's own RMSNorm, traced into the kernel

_LANES = 128


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def default_blocks(h: int, e: int, f: int) -> tuple[int, int]:
  """(heads per block, MLP tile): lane-aligned tiles when the dims allow, else whole dims."""
  hb = next((n for n in range(1, h + 1) if h % n == 0 and (n * e) % _LANES == 0), h)
  f_block = f if f <= 4 * _LANES else 4 * _LANES
  return hb, f_block


def _kernel(
  c_ref,
  x_ref,
  ln1_ref,
  wq_ref,
  wk_ref,
  wv_ref,
  kc_ref,
  vc_ref,
  seg_ref,
  segt_ref,
  proj_ref,
  ln2_ref,
  gate_ref,
  up_ref,
  down_ref,
  o_ref,
  kr_ref,
  vr_ref,
  x_s,
  xn_s,
  acc_s,
  *,
  eps,
  n_head_blocks,
  n_f_blocks,
  f,
  f_block,
):
  layer, i = pl.program_id(0), pl.program_id(1)
  c = c_ref[0]
  dt = x_ref.dtype
  b, num_pos, lanes = kc_ref.shape  # [B, C, l]

  @pl.when((layer == 0) & (i == 0))
  def _load_x():
    x_s[...] = x_ref[...]

  @pl.when(i == 0)
  def _init():
    xn_s[...] = rms_norm(x_s[...], ln1_ref[...], eps)
    acc_s[...] = jnp.zeros_like(acc_s)

  @pl.when(i < n_head_blocks)
  def _attention():
    xn = xn_s[...]  # [B,d]
    q = _dot(xn, wq_ref[...]).astype(dt)  # [B,l]
    k = _dot(xn, wk_ref[...]).astype(dt)
    v = _dot(xn, wv_ref[...]).astype(dt)
    kr_ref[...] = k
    vr_ref[...] = v
    pos = jax.lax.broadcasted_iota(jnp.int32, (b, num_pos, lanes), 1)
    k_all = jnp.where(pos == c, k[:, None, :], kc_ref[...]).astype(jnp.float32)  # [B,C,l]
    v_all = jnp.where(pos == c, v[:, None, :], vc_ref[...]).astype(jnp.float32)
    # Per-head q.k: multiply lane-wise, then sum each head's e lanes with the 0/1 matrix seg.
    prod = (q.astype(jnp.float32)[:, None, :] * k_all).reshape(b * num_pos, lanes)
    hb = seg_ref.shape[1]
    logits = _dot(prod, seg_ref[...]).astype(dt).astype(jnp.float32)  # [B*C,hb], rounded as ref
    logits = logits.reshape(b, num_pos, hb) * ((lanes // hb) ** -0.5)
    visible = jax.lax.broadcasted_iota(jnp.int32, (b, num_pos, hb), 1) <= c
    logits = jnp.where(visible, logits, _NEG_INF)
    m = jnp.max(logits, axis=1, keepdims=True)
    p = jnp.exp(logits - m)
    probs = (p / jnp.sum(p, axis=1, keepdims=True)).astype(dt).astype(jnp.float32)  # [B,C,hb]
    probs_l = _dot(probs.reshape(b * num_pos, hb), segt_ref[...]).reshape(b, num_pos, lanes)
    att = jnp.sum(probs_l * v_all, axis=1).astype(dt)  # [B,l]
    acc_s[...] += _dot(att, proj_ref[...])  # [B,d]

  @pl.when(i == n_head_blocks - 1)
  def _attention_residual():
    x1 = x_s[...] + acc_s[...].astype(dt)
    x_s[...] = x1
    xn_s[...] = rms_norm(x1, ln2_ref[...], eps)
    acc_s[...] = jnp.zeros_like(acc_s)

  @pl.when(i >= n_head_blocks)
  def _mlp():
    j = i - n_head_blocks
    y = xn_s[...]  # [B,d]
    g = _dot(y, gate_ref[...]).astype(dt).astype(jnp.float32)  # [B,F]
    u = _dot(y, up_ref[...]).astype(dt)
    act = (g * jax.nn.sigmoid(g)).astype(dt) * u  # [B,F]
    down = down_ref[...]  # [F,d]
    if f % f_block:  # the last tile runs past f: its padding may hold anything, NaN included
      valid = f - j * f_block
      act = jnp.where(jax.lax.broadcasted_iota(jnp.int32, act.shape, 1) < valid, act, 0)
      down = jnp.where(jax.lax.broadcasted_iota(jnp.int32, down.shape, 0) < valid, down, 0)
    acc_s[...] += _dot(act, down)

  @pl.when(i == n_head_blocks + n_f_blocks - 1)
  def _mlp_residual():
    x_s[...] = x_s[...] + acc_s[...].astype(dt)

  @pl.when((layer == pl.num_programs(0) - 1) & (i == n_head_blocks + n_f_blocks - 1))
  def _store_x():
    o_ref[...] = x_s[...]


def _call(
  p, x, k_cache, v_cache, c, eps, *, first: int, count: int, heads_per_block, f_block, interpret
):
  """Layers first..first+count-1 of stacked p [L,...] and caches [L,B,C,h,e], in one call.

  Returns (x [B,d], k rows, v rows [count,B,h*e]).
  """
  b, d = x.shape
  num_pos, h, e = k_cache.shape[-3:]
  f = p['gate'].shape[-1]
  dt = x.dtype
  hb0, fb0 = default_blocks(h, e, f)
  hb = heads_per_block or hb0
  f_block = f_block or fb0
  if h % hb:
    raise ValueError(f'heads_per_block {hb} does not divide the {h} depth heads')
  n_head_blocks, n_f_blocks, lanes = h // hb, pl.cdiv(f, f_block), hb * e
  he, num_layers = h * e, k_cache.shape[0]
  qkv = p['qkv'].astype(dt)  # [L,3,d,n]: q | k | v, each read in place (no copy)
  seg = (jnp.arange(lanes)[:, None] // e == jnp.arange(hb)[None, :]).astype(jnp.float32)  # [l,hb]
  head_blk = lambda i: jnp.minimum(i, n_head_blocks - 1)
  f_blk = lambda i: jnp.maximum(i - n_head_blocks, 0)
  spec = pl.BlockSpec
  # Stacked arrays: a squeezed leading block dim picks the layer (grid axis 0, from `first`).
  stacked = lambda block, index_map: pl.BlockSpec(
    (pl.squeezed, *block), lambda l, i, c: (first + l, *index_map(i, c))
  )
  full = lambda shape: spec(shape, lambda l, i, c: (0,) * len(shape))
  qkv_spec = lambda part: stacked((pl.squeezed, d, lanes), lambda i, c: (part, 0, head_blk(i)))
  cache_spec = stacked((b, num_pos, lanes), lambda i, c: (0, 0, head_blk(i)))
  row_spec = pl.BlockSpec((pl.squeezed, b, lanes), lambda l, i, c: (l, 0, head_blk(i)))
  in_specs = [
    full((b, d)),
    stacked((1, d), lambda i, c: (0, 0)),
    qkv_spec(0),
    qkv_spec(1),
    qkv_spec(2),
    cache_spec,
    cache_spec,
    full((lanes, hb)),
    full((hb, lanes)),
    stacked((lanes, d), lambda i, c: (head_blk(i), 0)),
    stacked((1, d), lambda i, c: (0, 0)),
    stacked((pl.squeezed, d, f_block), lambda i, c: (c[0], 0, f_blk(i))),
    stacked((pl.squeezed, d, f_block), lambda i, c: (c[0], 0, f_blk(i))),
    stacked((pl.squeezed, f_block, d), lambda i, c: (c[0], f_blk(i), 0)),
  ]
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(count, n_head_blocks + n_f_blocks),
    in_specs=in_specs,
    out_specs=[full((b, d)), row_spec, row_spec],
    scratch_shapes=[
      pltpu.VMEM((b, d), dt),
      pltpu.VMEM((b, d), dt),
      pltpu.VMEM((b, d), jnp.float32),
    ],
  )
  kernel = functools.partial(
    _kernel, eps=eps, n_head_blocks=n_head_blocks, n_f_blocks=n_f_blocks, f=f, f_block=f_block
  )
  rows = jax.ShapeDtypeStruct((count, b, he), dt)
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    interpret=interpret,
    name='depth_step_tpu',
    out_shape=[jax.ShapeDtypeStruct((b, d), dt), rows, rows],
    compiler_params=pltpu.CompilerParams(dimension_semantics=('arbitrary', 'arbitrary')),
  )(
    c,
    x,
    p['ln_1'].astype(dt).reshape(num_layers, 1, d),
    qkv,
    qkv,
    qkv,
    k_cache.astype(dt).reshape(num_layers, b, num_pos, he),
    v_cache.astype(dt).reshape(num_layers, b, num_pos, he),
    seg,
    seg.T,
    p['proj'].astype(dt).reshape(num_layers, he, d),
    p['ln_2'].astype(dt).reshape(num_layers, 1, d),
    p['gate'].astype(dt),
    p['up'].astype(dt),
    p['down'].astype(dt),
  )


def layer_step(
  p: dict,
  x: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  c: jax.Array,
  eps: float,
  *,
  layer: int | None = None,
  heads_per_block: int | None = None,
  f_block: int | None = None,
  interpret=False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Drop-in for flmjax.model.depth.layer_step (same arguments and results), as one TPU kernel.

  layer: None for one layer's params and caches; an int to take layer `layer` of stacked params
    ([L,...]) and caches ([L,B,C,h,e]) in place, returning the stacked caches updated.
  interpret: False, True, or a pltpu.InterpretParams (CPU testing).
  """
  tiles = dict(heads_per_block=heads_per_block, f_block=f_block, interpret=interpret)
  c = jnp.reshape(c, (1,)).astype(jnp.int32)
  if layer is None:  # one layer: a stack of one (free reshapes)
    one = lambda a: a[None]
    out, k_rows, v_rows = _call(
      jax.tree.map(one, p), x, one(k_cache), one(v_cache), c, eps, first=0, count=1, **tiles
    )
  else:
    out, k_rows, v_rows = _call(p, x, k_cache, v_cache, c, eps, first=int(layer), count=1, **tiles)
  # The cache write is one row per layer: XLA does it in place on the cache buffers.
  return out, *write_rows(k_cache, v_cache, k_rows[0], v_rows[0], c[0], layer)


def layers_step(
  p: dict,
  x: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  c: jax.Array,
  eps: float,
  *,
  heads_per_block: int | None = None,
  f_block: int | None = None,
  interpret=False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Drop-in for flmjax.model.depth.layers_step: all L layers of stacked p [L,...] and caches
  [L,B,C,h,e] in ONE kernel (x stays in VMEM between layers)."""
  c = jnp.reshape(c, (1,)).astype(jnp.int32)
  out, k_rows, v_rows = _call(
    p,
    x,
    k_cache,
    v_cache,
    c,
    eps,
    first=0,
    count=k_cache.shape[0],
    heads_per_block=heads_per_block,
    f_block=f_block,
    interpret=interpret,
  )
  b, (h, e) = x.shape[0], k_cache.shape[-2:]
  at = (0, 0, c[0], 0, 0)
  rows = lambda r: r.reshape(-1, b, 1, h, e).astype(k_cache.dtype)  # [L,B,1,h,e]
  k_cache = jax.lax.dynamic_update_slice(k_cache, rows(k_rows), at)
  v_cache = jax.lax.dynamic_update_slice(v_cache, rows(v_rows), at)
  return out, k_cache, v_cache

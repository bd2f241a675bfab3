"""Depth-layer step for GPU (Pallas on Triton): five kernels per layer, each spread over the SMs.

At B <= 128 the step is a chain of matrix-vector products, bound by reading the weights. One
kernel per layer would run on one SM, so the layer is cut only where every output needs every
input (Triton has no grid-wide barrier); each piece is a split-N GEMV with its norm and epilogue
fused:
  1. qkv:     RMSNorm 1 + the fused q|k|v projection             grid (batch tiles, 3 x h*e tiles)
  2. attend:  attention of each head over the C cached positions grid (batch tiles, heads)
  3. proj:    output projection + residual                        grid (batch tiles, d tiles)
  4. mlp_in:  RMSNorm 2 + gate/up of codebook c + silu(g) * u     grid (batch tiles, f tiles)
  5. mlp_out: down projection of codebook c + residual            grid (batch tiles, d tiles)
(fuse_attention=True merges 1 and 2: one program per head.) Triton needs power-of-two tiles, so
every tile is loaded and stored with a bounds mask: any d, e, f or B works. With `layer`, the
kernels read that layer of stacked [L,...] weights and caches in place.
Shape letters as in flmjax/model/layers.py (B: the rows, C: the cache positions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flmjax.kernels.common import write_rows
from flmjax.model.layers import NEG_INF as _NEG_INF  # the model's own mask value

_F32 = jnp.float32


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _tile(*index):
  """Masked load. Each index is an int/scalar (squeezed) or (start, size, limit): size lanes from
  `start`, where those at or past `limit` read 0."""
  idx, mask, shape = [], None, [i[1] for i in index if isinstance(i, tuple)]
  axis = 0
  for i in index:
    if not isinstance(i, tuple):
      idx.append(jnp.int32(i) if isinstance(i, int) else i)  # a Python int as an int32 scalar
      continue
    start, size, limit = i
    idx.append(pl.ds(start, size))
    m = start + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < limit
    mask = m if mask is None else mask & m
    axis += 1
  return idx, mask


def _load(ref, *index):
  idx, mask = _tile(*index)
  return plgpu.load(ref.at[tuple(idx)], mask=mask, other=0)


def _store(ref, value, *index):
  idx, mask = _tile(*index)
  plgpu.store(ref.at[tuple(idx)], value.astype(ref.dtype), mask=mask)


def _dot(a, b):
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else None  # no silent tf32
  return jnp.dot(a, b, preferred_element_type=_F32, precision=precision)


def _rms_scale(x_ref, rows, d, kb, eps):
  """1 / rms of B-tile `rows` of x [B,d], accumulated over d in tiles of kb: [BB] f32."""

  def body(k, ss):
    xt = _load(x_ref, rows, (k * kb, kb, d)).astype(_F32)
    return ss + jnp.sum(xt * xt, axis=1)

  ss = jax.lax.fori_loop(0, pl.cdiv(d, kb), body, jnp.zeros((rows[1],), _F32))
  return jax.lax.rsqrt(ss / d + eps)


def _normed(x_ref, ln_ref, rows, k, kb, d, scale, lead):
  """Tile k of rms_norm(x) in the official order: f32 normalise, cast, then scale."""
  xt = _load(x_ref, rows, (k * kb, kb, d))
  return (xt.astype(_F32) * scale[:, None]).astype(xt.dtype) * _load(ln_ref, *lead, (k * kb, kb, d))


def _rows(b, bb):
  return (pl.program_id(0) * bb, bb, b)


# Every kernel reads ids = [c, layer] (int32 [2]). `lead` is () for one layer's weights, or
# (layer,) to index a stacked [L,...] weight or cache in place (no XLA slice copy before the
# call). The layer is a runtime value, so the L layers share one compiled kernel.
def _ids(ids_ref, stacked):
  return ids_ref[0], ((ids_ref[1],) if stacked else ())


def _qkv_kernel(ids_ref, x_ref, ln_ref, w_ref, o_ref, *, eps, kb, nb, stacked):
  """Output tile j of part s (q, k or v) from w [(L,)3,d,n]; o [B,3n] is q | k | v."""
  _, lead = _ids(ids_ref, stacked)
  (b, d), n = x_ref.shape, w_ref.shape[-1]
  tiles = pl.cdiv(n, nb)
  part, j = pl.program_id(1) // tiles, pl.program_id(1) % tiles
  rows, cols = _rows(b, _bb(b)), (j * nb, nb, n)
  scale = _rms_scale(x_ref, rows, d, kb, eps)

  def body(k, acc):
    return acc + _dot(
      _normed(x_ref, ln_ref, rows, k, kb, d, scale, lead),
      _load(w_ref, *lead, part, (k * kb, kb, d), cols),
    )

  acc = jax.lax.fori_loop(0, pl.cdiv(d, kb), body, jnp.zeros((rows[1], nb), _F32))
  _store(o_ref, acc, rows, (part * n + j * nb, nb, (part + 1) * n))


def _attention(q, k, v, kc_ref, vc_ref, rows, c, hi, head_dim, ep, lead):
  """One head over the C positions: q/k/v [BB,E] (this step's, in the compute dtype) and the
  cache tiles of rows x positions x this head's lanes. Returns att [BB,E] f32."""
  num_pos = kc_ref.shape[-2]  # caches [(L,)B,C,h*e]
  cp = _pow2(num_pos)
  heads = (hi * head_dim, ep, (hi + 1) * head_dim)
  pos = jax.lax.broadcasted_iota(jnp.int32, (rows[1], cp, ep), 1)
  k_all = jnp.where(pos == c, k[:, None, :], _load(kc_ref, *lead, rows, (0, cp, num_pos), heads))
  v_all = jnp.where(pos == c, v[:, None, :], _load(vc_ref, *lead, rows, (0, cp, num_pos), heads))
  dt = k_all.dtype
  logits = jnp.sum(q.astype(_F32)[:, None, :] * k_all.astype(_F32), axis=2)  # [BB,C]
  logits = logits.astype(dt).astype(_F32) * (head_dim**-0.5)  # rounded like the reference
  logits = jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) <= c, logits, _NEG_INF)
  p = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  probs = (p / jnp.sum(p, axis=1, keepdims=True)).astype(dt).astype(_F32)
  return jnp.sum(probs[:, :, None] * v_all.astype(_F32), axis=1)


def _head_lanes(head_dim):
  return max(_pow2(head_dim), 16)  # Triton's dot needs N >= 16; the extra lanes load as 0


def _attend_kernel(ids_ref, qkv_ref, kc_ref, vc_ref, o_ref, *, num_heads, head_dim, stacked):
  b, he, ep = qkv_ref.shape[0], num_heads * head_dim, _head_lanes(head_dim)
  (c, lead), hi, rows = _ids(ids_ref, stacked), pl.program_id(1), _rows(b, _bb_attention(b))
  lane = lambda part: (part * he + hi * head_dim, ep, part * he + (hi + 1) * head_dim)
  q, k, v = (_load(qkv_ref, rows, lane(s)) for s in range(3))  # [BB,E]
  att = _attention(q, k, v, kc_ref, vc_ref, rows, c, hi, head_dim, ep, lead)
  _store(o_ref, att, rows, (hi * head_dim, ep, (hi + 1) * head_dim))


def _qkv_attend_kernel(
  ids_ref,
  x_ref,
  ln_ref,
  w_ref,
  kc_ref,
  vc_ref,
  o_ref,
  kr_ref,
  vr_ref,
  *,
  eps,
  kb,
  num_heads,
  head_dim,
  stacked,
):
  """RMSNorm 1, this head's q/k/v, and its attention in one program: 4 launches a layer."""
  (b, d), ep = x_ref.shape, _head_lanes(head_dim)
  (c, lead), hi, rows = _ids(ids_ref, stacked), pl.program_id(1), _rows(b, _bb_attention(b))
  own = (hi * head_dim, ep, (hi + 1) * head_dim)  # this head's lanes of w [(L,)3,d,n]
  scale = _rms_scale(x_ref, rows, d, kb, eps)

  def body(k, acc):
    y = _normed(x_ref, ln_ref, rows, k, kb, d, scale, lead)
    return tuple(
      a + _dot(y, _load(w_ref, *lead, s, (k * kb, kb, d), own)) for s, a in enumerate(acc)
    )

  zeros = jnp.zeros((rows[1], ep), _F32)
  q, k, v = (
    a.astype(x_ref.dtype) for a in jax.lax.fori_loop(0, pl.cdiv(d, kb), body, (zeros, zeros, zeros))
  )
  _store(kr_ref, k, rows, own)
  _store(vr_ref, v, rows, own)
  _store(o_ref, _attention(q, k, v, kc_ref, vc_ref, rows, c, hi, head_dim, ep, lead), rows, own)


def _residual_kernel(ids_ref, x_ref, a_ref, w_ref, o_ref, *, kb, nb, has_c, stacked):
  """o = x + a @ w (w indexed by codebook c when has_c): the output projection and MLP down."""
  c, lead = _ids(ids_ref, stacked)
  book = (*lead, c) if has_c else lead  # one indexer with the tile's: no chained .at[] in Triton
  (b, d), k_dim = x_ref.shape, a_ref.shape[1]
  rows, cols = _rows(b, _bb(b)), (pl.program_id(1) * nb, nb, d)

  def body(k, acc):
    a = _load(a_ref, rows, (k * kb, kb, k_dim))
    return acc + _dot(a, _load(w_ref, *book, (k * kb, kb, k_dim), cols))

  acc = jax.lax.fori_loop(0, pl.cdiv(k_dim, kb), body, jnp.zeros((rows[1], nb), _F32))
  x = _load(x_ref, rows, cols)
  _store(o_ref, x + acc.astype(x.dtype), rows, cols)


def _mlp_in_kernel(ids_ref, x_ref, ln_ref, gate_ref, up_ref, o_ref, *, eps, kb, nb, stacked):
  (b, d), f = x_ref.shape, gate_ref.shape[-1]
  c, lead = _ids(ids_ref, stacked)
  book = (*lead, c)
  rows, cols = _rows(b, _bb(b)), (pl.program_id(1) * nb, nb, f)
  scale = _rms_scale(x_ref, rows, d, kb, eps)

  def body(k, acc):
    g, u = acc
    y = _normed(x_ref, ln_ref, rows, k, kb, d, scale, lead)
    return (
      g + _dot(y, _load(gate_ref, *book, (k * kb, kb, d), cols)),
      u + _dot(y, _load(up_ref, *book, (k * kb, kb, d), cols)),
    )

  zeros = jnp.zeros((rows[1], nb), _F32)
  g, u = jax.lax.fori_loop(0, pl.cdiv(d, kb), body, (zeros, zeros))
  dt = o_ref.dtype
  g = g.astype(dt).astype(_F32)
  _store(o_ref, (g * jax.nn.sigmoid(g)).astype(dt) * u.astype(dt), rows, cols)


def _bb_attention(b: int) -> int:
  """Attention holds [BB,C,E] tiles in registers: 16 rows keep them small."""
  return min(_bb(b), 16)


def _bb(b: int) -> int:
  """Batch tile: >= 16 rows for Triton's dot, <= 64 to bound registers."""
  return min(max(_pow2(b), 16), 64)


def layer_step(
  p: dict,
  x: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  c: jax.Array,
  eps: float,
  *,
  layer: int | None = None,
  kb: int = 64,
  nb: int = 32,
  num_warps: int = 4,
  num_stages: int = 3,
  fuse_attention: bool = False,
  interpret=False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Drop-in for flmjax.model.depth.layer_step (same arguments and results), as Triton kernels.

  layer: None for one layer's params and caches; an int to take layer `layer` of stacked params
    ([L,...]) and caches ([L,B,C,h,e]) in place, returning the stacked caches updated.
  kb / nb: reduction / output tile widths (powers of two; Triton's dot needs >= 16).
  fuse_attention: one program per head does RMSNorm 1, q/k/v and attention (4 launches a layer
    instead of 5, but only h programs read the q/k/v weights).
  """
  if kb & (kb - 1) or nb & (nb - 1) or kb < 16 or nb < 16:
    raise ValueError(f'kb={kb} and nb={nb} must be powers of two >= 16 (Triton tiles)')
  stacked = layer is not None
  stack = k_cache.shape[:1] if stacked else ()  # (L,) or ()
  b, d = x.shape
  num_pos, h, e = k_cache.shape[-3:]
  f, he, dt = p['gate'].shape[-1], h * e, x.dtype
  bt, bt_att = pl.cdiv(b, _bb(b)), pl.cdiv(b, _bb_attention(b))
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  call = lambda kernel, grid, shape, name: pl.pallas_call(
    functools.partial(kernel, stacked=stacked),
    grid=grid,
    out_shape=jax.ShapeDtypeStruct(shape, dt),
    interpret=interpret,
    compiler_params=params,
    name=name,
  )
  c = jnp.reshape(c, ()).astype(jnp.int32)
  ids = jnp.stack([c, jnp.asarray(0 if layer is None else layer, jnp.int32)])
  ln_1, ln_2 = p['ln_1'].astype(dt), p['ln_2'].astype(dt)
  kc = k_cache.astype(dt).reshape(*stack, b, num_pos, he)
  vc = v_cache.astype(dt).reshape(*stack, b, num_pos, he)
  w_qkv = p['qkv'].astype(dt)  # [(L,)3,d,n], read in place
  if fuse_attention:
    att, k_row, v_row = pl.pallas_call(
      functools.partial(
        _qkv_attend_kernel, eps=eps, kb=kb, num_heads=h, head_dim=e, stacked=stacked
      ),
      grid=(bt_att, h),
      out_shape=[jax.ShapeDtypeStruct((b, he), dt)] * 3,
      interpret=interpret,
      compiler_params=params,
      name='depth_qkv_attend',
    )(ids, x, ln_1, w_qkv, kc, vc)
  else:
    qkv = call(
      functools.partial(_qkv_kernel, eps=eps, kb=kb, nb=nb),
      (bt, 3 * pl.cdiv(he, nb)),
      (b, 3 * he),
      'depth_qkv',
    )(ids, x, ln_1, w_qkv)
    att = call(
      functools.partial(_attend_kernel, num_heads=h, head_dim=e),
      (bt_att, h),
      (b, he),
      'depth_attend',
    )(ids, qkv, kc, vc)
    k_row, v_row = qkv[:, he : 2 * he], qkv[:, 2 * he :]
  x1 = call(
    functools.partial(_residual_kernel, kb=kb, nb=nb, has_c=False),
    (bt, pl.cdiv(d, nb)),
    (b, d),
    'depth_proj',
  )(ids, x, att, p['proj'].astype(dt).reshape(*stack, he, d))
  act = call(
    functools.partial(_mlp_in_kernel, eps=eps, kb=kb, nb=nb),
    (bt, pl.cdiv(f, nb)),
    (b, f),
    'depth_mlp_in',
  )(ids, x1, ln_2, p['gate'].astype(dt), p['up'].astype(dt))
  out = call(
    functools.partial(_residual_kernel, kb=kb, nb=nb, has_c=True),
    (bt, pl.cdiv(d, nb)),
    (b, d),
    'depth_mlp_out',
  )(ids, x1, act, p['down'].astype(dt))
  return out, *write_rows(k_cache, v_cache, k_row, v_row, c, layer)

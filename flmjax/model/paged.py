"""A paged KV cache: one pool of pages per tensor kind, a page table and a page count per session.

The pool is [K, L·NP, P, H] (KV heads, layers × pages, page positions, head dim): the layout of
JAX's TPU paged-attention kernel (`k_pages [K, total_pages, P, H]`), with every layer's pages in
one array so the kernel reads a layer's pages through page ids offset by layer·NP, and nothing is
sliced (copied) out of the pool per layer. A session's position t sits at entry t mod (held·P) of
its own pages (table[b, e // P], slot e % P): a ring over the pages it holds, so a session that
cannot take another page slides over the ones it has.

int8 (`dtype=int8`): the pool holds int8 values and a scale per token and per KV head
('k_scale', 'v_scale' [K, L·NP, P] float32), the format of the kernel's quantization_utils
(value = int8 · scale / 127.5, scale = max |x| over the head dim).
Shape letters as in layers.py; NP pages per layer, P positions per page, M pages per session.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flmjax import sharding as shd
from flmjax.model import attention, layers

IMPLS = ('auto', 'xla', 'kernel', 'interpret', 'gpu_interpret')
KV_DTYPES = ('bf16', 'int8')  # bf16: the model's compute dtype
POOL_NAMES = ('k', 'v', 'k_scale', 'v_scale')
MAX_INT8 = 127.5  # quantization_utils.MAX_INT8 of jax's paged-attention kernel
POOL_AXES = ('kv_heads', None, None, 'head_dim')  # logical axes of a pool [K, L·NP, P, H]
SCALE_AXES = ('kv_heads', None, None)  # of its scales [K, L·NP, P]


def init_pool(cfg, pages: int, page_size: int, dtype=None, kv_dtype: str = 'bf16') -> dict:
  """{'k','v'} [K, L·pages, P, H] zeros (+ 'k_scale','v_scale' [K, L·pages, P] for int8)."""
  shape = (cfg.num_kv_heads, cfg.num_layers * pages, page_size, cfg.head_dim)
  if kv_dtype == 'int8':
    zeros = lambda: jnp.zeros(shape, jnp.int8)
    scales = lambda: jnp.zeros(shape[:-1], jnp.float32)
    return {'k': zeros(), 'v': zeros(), 'k_scale': scales(), 'v_scale': scales()}
  dtype = dtype or cfg.compute_dtype
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., H] -> (int8 [..., H], scale [...] float32): a scale per token and head."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1)
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.rint(x * (MAX_INT8 / safe[..., None])).astype(jnp.int8), scale


def dequantize(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return (x.astype(jnp.float32) * (scale[..., None] / MAX_INT8)).astype(dtype)


def entries(positions: jax.Array, held: jax.Array, page_size: int) -> jax.Array:
  """positions [B], held [B] -> [B]: the entry of the session's pages that holds the position."""
  return positions % (jnp.maximum(held, 1) * page_size)


def locate(positions, table, held, layer, num_pages: int, page_size: int, writes):
  """-> (page [B], slot [B]): where each session's position goes in the pool. Rows where writes
  [B] is False (free slots, sessions without a page) get page L·NP, out of range, so `write`
  drops them: their table may name pages that another session now holds."""
  e = entries(positions, held, page_size)
  page = jnp.take_along_axis(table, (e // page_size)[:, None], axis=1)[:, 0] + layer * num_pages
  return jnp.where(writes, page, jnp.iinfo(jnp.int32).max), e % page_size


def write(pool: dict, name: str, new: jax.Array, page: jax.Array, slot: jax.Array) -> dict:
  """pool with new [B,K,H] written at (page, slot) [B] of pool[name] (and its scales)."""
  out = dict(pool)
  arr = pool[name]
  if arr.dtype == jnp.int8:
    values, scale = quantize(new)  # [B,K,H], [B,K]
    out[name] = arr.at[:, page, slot].set(jnp.swapaxes(values, 0, 1), mode='drop')
    sname = f'{name}_scale'
    out[sname] = pool[sname].at[:, page, slot].set(jnp.swapaxes(scale, 0, 1), mode='drop')
  else:
    out[name] = arr.at[:, page, slot].set(jnp.swapaxes(new, 0, 1).astype(arr.dtype), mode='drop')
  return out


def constrain(pool: dict) -> dict:
  """The pool's arrays pinned as stored (KV heads over tensor) on the mesh in context."""
  return {n: shd.constrain(x, POOL_AXES if x.ndim == 4 else SCALE_AXES) for n, x in pool.items()}


def attend(q: jax.Array, pool: dict, cache: dict, offset, count: jax.Array) -> jax.Array:
  """q [B,1,N,H] -> [B,1,N,H] over one layer's pages (page ids + offset = layer · NP).

  cache['impl']: 'xla' reads the first U table columns (cache['read'] [B,U]); 'kernel' is the
  platform's kernel (TPU's on TPU, else GPU's) over the whole table, which reads only the pages
  below each length; 'interpret' / 'gpu_interpret' run the TPU / GPU kernel in interpret mode;
  'auto' takes the TPU kernel on TPU (bf16 pages), the GPU kernel on GPU (where it fits), else XLA.
  """
  impl = cache['impl']
  where = attention.platform()
  if impl == 'auto':  # int8 on TPU: the kernel's int8 format would broadcast the scales (aot)
    tpu = where == 'tpu' and pool['k'].dtype != jnp.int8
    gpu = where == 'gpu' and gpu_kernel_fits(pool['k'].shape[2], q.shape[-1])
    impl = 'kernel' if tpu or gpu else 'xla'
  if impl == 'xla':
    return attend_xla(q, pool, cache['read'] + offset, count)
  ids = cache['table'] + offset
  if impl == 'gpu_interpret' or (impl == 'kernel' and where == 'gpu'):
    return attend_kernel(q, pool, ids, count, kind='gpu', interpret=impl == 'gpu_interpret')
  return attend_kernel(q, pool, ids, count, interpret=impl == 'interpret')


def gpu_kernel_fits(page_size: int, head_dim: int) -> bool:
  """Triton's dots want blocks of at least 16 in powers of two: a page (the kernel's block of
  keys is pages of it) and the head dim."""
  pow2 = lambda n: n >= 16 and n & (n - 1) == 0
  return pow2(page_size) and pow2(head_dim)


def counts(positions: jax.Array, held: jax.Array, page_size: int) -> jax.Array:
  """[B] int32: the entries a session attends (every position it holds, up to this one)."""
  return jnp.minimum(positions + 1, held * page_size).astype(jnp.int32)


def gather(pool: dict, name: str, ids: jax.Array, dtype) -> jax.Array:
  """The pages ids [B,U] of pool[name] as one [B, U·P, K, H] array in dtype."""
  x = pool[name][:, ids]  # [K,B,U,P,H]
  if x.dtype == jnp.int8:
    x = dequantize(x, pool[f'{name}_scale'][:, ids], dtype)
  k, b, u, p, h = x.shape
  return jnp.transpose(x, (1, 2, 3, 0, 4)).reshape(b, u * p, k, h)


def attend_xla(q: jax.Array, pool: dict, ids: jax.Array, count: jax.Array) -> jax.Array:
  """q [B,1,N,H] over the first count [B] entries of pages ids [B,U] -> [B,1,N,H].

  Reads U pages a session (U: the batch's most pages in use, bucketed by the caller), not the
  pool, and applies the contiguous cache's own attention (layers.gqa_attention) to them.
  """
  if pool['k'].dtype == jnp.int8:
    return _attend_int8(q, pool, ids, count)
  k = gather(pool, 'k', ids, q.dtype)
  v = gather(pool, 'v', ids, q.dtype)
  mask = jnp.arange(k.shape[1])[None, None, :] < count[:, None, None]  # [B,1,U·P]
  # Entries past a session's count may be another session's (or a stale) page: zero their
  # values so even a NaN there cannot reach the output through a zero weight.
  v = jnp.where(mask[:, 0, :, None, None], v, jnp.zeros((), v.dtype))
  return layers.gqa_attention(q, k, v, mask)


def _attend_int8(q: jax.Array, pool: dict, ids: jax.Array, count: jax.Array) -> jax.Array:
  """attend_xla on int8 pages: the scales multiply the logits and the probabilities rather than
  the pages, so only the int8 pages are gathered (a dequantized bf16 copy of every page in use
  measured 3.24 GiB of temporaries for the 8B at 512 sessions on v5e)."""
  b, _, n, h = q.shape

  def pages(name):  # -> [K,B,S,H] int8, [K,B,S] float32 (scale / 127.5)
    x, scale = pool[name][:, ids], pool[f'{name}_scale'][:, ids]
    k_, b_, u, p, h_ = x.shape
    return x.reshape(k_, b_, u * p, h_), scale.reshape(k_, b_, u * p) / MAX_INT8

  k, ks = pages('k')
  v, vs = pages('v')
  kv = k.shape[0]
  qg = q[:, 0].reshape(b, kv, n // kv, h)  # [B,K,G,H]
  logits = jnp.einsum('BKGH,KBSH->BKGS', qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
  logits = logits * jnp.swapaxes(ks, 0, 1)[:, :, None, :] * (h**-0.5)
  mask = jnp.arange(k.shape[2])[None, :] < count[:, None]  # [B,S]
  logits = jnp.where(mask[:, None, None, :], logits, layers.NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1) * jnp.swapaxes(vs, 0, 1)[:, :, None, :]
  probs = jnp.where(mask[:, None, None, :], probs, 0.0).astype(q.dtype)
  out = jnp.einsum('BKGS,KBSH->BKGH', probs, v.astype(q.dtype))
  return out.reshape(b, 1, n, h)


def kernel_block(pages_per_session: int) -> int:
  """The kernel's pages_per_compute_block: the largest of 8, 4, 2, 1 dividing M."""
  return next(b for b in (8, 4, 2, 1) if pages_per_session % b == 0)


def attend_kernel(
  q: jax.Array,
  pool: dict,
  ids: jax.Array,
  count: jax.Array,
  *,
  kind: str = 'tpu',
  interpret: bool = False,
) -> jax.Array:
  """The same attention through JAX's paged-attention kernel: kind 'tpu' is
  jax.experimental.pallas.ops.tpu.paged_attention (on CPU, interpret=True runs it in TPU
  interpret mode), 'gpu' is jax.experimental.pallas.ops.gpu.paged_attention (Triton; interpret
  mode on CPU). ids [B,M] global page ids (layer offset in).

  On a mesh it runs in shard_map: sessions over the batch axes, heads over tensor where the KV
  heads split as the query heads do; otherwise every shard computes all heads.
  """
  from jax.sharding import PartitionSpec as PS

  from flmjax import sharding as shd

  b, _, n, h = q.shape
  quantized = pool['k'].dtype == jnp.int8
  # The kernels do not scale: scale q in float32 (the XLA path scales the float32 logits); the
  # GPU kernel's int8 keys also want the 1/127.5 of their scales here (see _gpu_local).
  scale = h**-0.5 / (MAX_INT8 if quantized and kind == 'gpu' else 1.0)
  q = (q[:, 0].astype(jnp.float32) * scale).astype(q.dtype)  # [B,N,H]
  names = ('k', 'v', 'k_scale', 'v_scale') if quantized else ('k', 'v')
  arrays = tuple(pool[x] for x in names)
  local = functools.partial(_tpu_local if kind == 'tpu' else _gpu_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = local(q, ids, count, *arrays)
  else:
    q_spec = shd.logical_to_spec(('activation_batch', 'activation_heads', None), q.shape, mesh)
    pool_spec = shd.logical_to_spec(POOL_AXES, arrays[0].shape, mesh)
    if q_spec[1] != pool_spec[0]:  # KV heads the tensor axis cannot split: all heads a shard
      q_spec = PS(q_spec[0], None, None)
      pool_spec = PS(None, None, None, None)
    rows = PS(q_spec[0])
    specs = (pool_spec, pool_spec, PS(*pool_spec[:3]), PS(*pool_spec[:3]))[: len(arrays)]
    out = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(q_spec, PS(q_spec[0], None), rows) + specs,
      out_specs=q_spec,
      check_vma=False,
    )(q, ids, count, *arrays)
  return out[:, None]


def _tpu_local(q, ids, count, *arrays, interpret: bool):
  """One shard's TPU kernel call. It casts every page to bfloat16 as it loads it (float32 pages
  too: MultiPageAsyncCopyDescriptor._maybe_dequantize), see docs/decoding.md."""
  import contextlib

  from jax.experimental.pallas import tpu as pltpu
  from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
  from jax.experimental.pallas.ops.tpu.paged_attention.quantization_utils import QuantizedTensor

  if len(arrays) == 4:
    k = QuantizedTensor(arrays[0], arrays[2][..., None])
    v = QuantizedTensor(arrays[1], arrays[3][..., None])
  else:
    k, v = arrays
  ctx = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
  with ctx:
    out = paged_attention(q, k, v, count, ids, pages_per_compute_block=kernel_block(ids.shape[1]))
  return out.astype(q.dtype)


def _gpu_local(q, ids, count, *arrays, interpret: bool):
  """One shard's GPU kernel call. Its int8 format is this pool's (a scale per token and head,
  multiplying the logits and the probabilities); its scales are value = int8 · scale, so the
  1/127.5 is in q for the keys (attend_kernel) and goes onto the output for the values (nothing
  copies the pool's scales). The table splits into k_splits partitions (combined by the
  kernel's last flash round), each read in blocks of pages_per_compute_block pages."""
  from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

  m = ids.shape[1]
  splits = next(s for s in (16, 8, 4, 2, 1) if m % s == 0)
  kw = dict(pages_per_compute_block=kernel_block(m // splits), k_splits=splits)
  if len(arrays) == 4:
    k, v, ks, vs = arrays
    out = paged_attention(q, k, v, ids, count, ks, vs, interpret=interpret, **kw)
    return (out.astype(jnp.float32) / MAX_INT8).astype(q.dtype)
  k, v = arrays
  return paged_attention(q, k, v, ids, count, interpret=interpret, **kw).astype(q.dtype)

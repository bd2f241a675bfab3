"""Causal self-attention for teacher-forced passes, without a [B,N,T,S] float32 score array.

The implementation is picked when the function is traced, from the platform of the mesh in
context (`jax.sharding.get_abstract_mesh()`, which the train and eval steps set), else from
`jax.default_backend()`; so a step compiled ahead of time for a TPU topology on a CPU host gets
the TPU path:
  tpu       splash attention (jax.experimental.pallas.ops.tpu), in a shard_map over the mesh;
  gpu       jax.nn.dot_product_attention through cuDNN in bf16/f16; `chunked` in float32 or
            where cuDNN cannot take the call;
  cpu       `chunked`: blocks of queries, each a whole-row float32 softmax over its keys,
            recomputed in the backward pass; a window of at most one block runs `plain`.
Every path takes q·k and the softmax in float32. The decoder's one-frame step keeps its own
path (layers.gqa_attention over the cache).
Shape letters as in layers.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd
from flmjax.model import layers

IMPLS = ('auto', 'plain', 'chunked', 'splash', 'cudnn')
_PLATFORM = {'cpu': 'cpu', 'tpu': 'tpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu'}
BLOCK = 512  # query rows per block of the chunked path
_SPLASH_BLOCKS = (512, 256, 128)  # splash tiles; the window is padded to a multiple of 128


def platform() -> str:
  """'cpu' | 'gpu' | 'tpu': the context mesh's device platform, else the default backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  name = device.platform if device is not None else jax.default_backend()
  return _PLATFORM.get(name, 'cpu')


def causal_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = 'auto', block: int | None = None
) -> jax.Array:
  """q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H]: query t attends keys 0..t (GQA: head n reads KV
  head n // G). `impl` forces one path ('plain' is the reference); `block` (default BLOCK) is
  the chunked path's block of query rows."""
  block = block or BLOCK
  if impl not in IMPLS:
    raise ValueError(f'causal_attention: unknown impl {impl!r}; use one of {IMPLS}')
  if impl == 'auto':
    impl = {'tpu': 'splash', 'gpu': 'cudnn', 'cpu': 'chunked'}[platform()]
  if impl == 'splash':
    return splash(q, k, v)
  if impl == 'cudnn':
    return cudnn(q, k, v, fallback=functools.partial(chunked, block=block))
  if impl == 'chunked':
    return chunked(q, k, v, block=block)
  return plain(q, k, v)


def plain(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The reference: the whole [B,K,G,T,S] score array at once."""
  t = q.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  return layers.gqa_attention(q, k, v, jnp.broadcast_to(mask, (q.shape[0], t, t)))


def chunked(q: jax.Array, k: jax.Array, v: jax.Array, *, block: int = BLOCK) -> jax.Array:
  """Query blocks of `block` rows, one after another (lax.map), each rematerialised: the live
  scores are [B,K,G,block,S]. Each row's softmax is the plain path's, so values match it."""
  b, t = q.shape[:2]
  if t <= block:
    return plain(q, k, v)
  num_blocks = -(-t // block)
  q = jnp.pad(q, ((0, 0), (0, num_blocks * block - t), (0, 0), (0, 0)))
  q = rearrange(q, 'B (nb block) N H -> nb B block N H', block=block)
  keys = jnp.arange(t)

  @jax.checkpoint
  def one(xs):
    i, qb = xs
    rows = i * block + jnp.arange(block)
    mask = jnp.broadcast_to(keys[None, :] <= rows[:, None], (b, block, t))  # [B,block,S]
    return layers.gqa_attention(qb, k, v, mask)

  out = jax.lax.map(one, (jnp.arange(num_blocks), q))  # [nb,B,block,N,H]
  return rearrange(out, 'nb B block N H -> B (nb block) N H')[:, :t]


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, fallback) -> jax.Array:
  """jax.nn.dot_product_attention's cuDNN kernel (flash attention, float32 softmax); cuDNN
  takes bf16/f16 only, so float32, or a cuDNN that refuses the shapes, runs `fallback`."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return fallback(q, k, v)
  try:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
  except (NotImplementedError, ValueError, RuntimeError):  # no cuDNN, or shapes it cannot take
    return fallback(q, k, v)


def _splash_kernel(num_heads: int, t: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(num_heads)])
  bq = next(s for s in _SPLASH_BLOCKS if t % s == 0)
  sizes = sk.BlockSizes(
    block_q=bq,
    block_kv=bq,
    block_kv_compute=bq,
    block_q_dkv=bq,
    block_kv_dkv=bq,
    block_kv_dkv_compute=bq,
    block_q_dq=bq,
    block_kv_dq=bq,
  )
  return sk.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def splash(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
  """Splash attention (TPU). The window is padded to a multiple of 128: padded keys sit after
  every real query, so the causal mask hides them. On a mesh, batch and heads are split as the
  rules table says; KV heads the tensor axis does not divide are repeated to one per q head."""
  b, t, n, h = q.shape
  tp = -(-t // 128) * 128
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  # Splash does not scale: scale q in float32 (the plain path scales the float32 logits).
  q = (q.astype(jnp.float32) * h**-0.5).astype(q.dtype)
  q, k, v = pad(q), pad(k), pad(v)
  mesh = jax.sharding.get_abstract_mesh()
  q_spec = k_spec = P(None, None, None, None)
  if not mesh.empty:
    q_spec = shd.logical_to_spec(
      ('activation_batch', 'activation_length', 'activation_heads', None), q.shape, mesh
    )
    k_spec = shd.logical_to_spec(
      ('activation_batch', 'activation_length', 'activation_kv_heads', None), k.shape, mesh
    )
    if q_spec[2] != k_spec[2]:  # GQA with fewer KV heads than tensor shards
      k, v = (jnp.repeat(x, n // k.shape[2], axis=2) for x in (k, v))
      k_spec = q_spec
  heads_local = n // _ways(mesh, q_spec[2])

  def local(q, k, v):  # [b,T,N,H] -> splash's [b,N,T,H]
    kernel = _splash_kernel(heads_local, tp, interpret)
    to = lambda x: jnp.swapaxes(x, 1, 2)
    return to(jax.vmap(kernel)(to(q), to(k), to(v)))

  if mesh.empty:
    out = local(q, k, v)
  else:
    out = jax.shard_map(
      local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec), out_specs=q_spec, check_vma=False
    )(q, k, v)
  return out[:, :t]


def _ways(mesh, axes) -> int:
  if axes is None or mesh.empty:
    return 1
  return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))

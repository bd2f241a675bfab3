"""Mimi's encoder/decoder transformer: pre-LayerNorm, interleaved RoPE, layer-scale, GELU MLP,
causal attention over a window of `context` 25 Hz steps.

Two modes, each matching its official counterpart (golden/README.md, mimi_small):
- `forward` (batch): query t sees keys t-context+1 .. t. Computed blockwise (blocks of `context`
  queries against their own and the previous block's keys), so memory grows linearly with T.
- `step` (streaming): a ring buffer of exactly `context` keys per layer, written T steps at a time.
  Once full, a query that is not the last of its step sees fewer than `context` keys, as in
  the official RingKVCache.

Shapes: B batch, T query time, S key time, D model, N heads, H head dim, F feed-forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from flmjax.codec.mimi_config import MimiConfig
from flmjax.model.layers import NEG_INF  # finite: a row with no visible key stays NaN-free


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
  """x [..., I...] times w [I..., O...] over the `in_dims` leading dims of w, as one 2-D matmul:
  XLA:CPU runs 2-D dots several times faster than the same contraction written as an N-D einsum."""
  lead, n_in = x.shape[: x.ndim - in_dims], int(np.prod(w.shape[:in_dims]))
  y = x.reshape(-1, n_in) @ w.reshape(n_in, -1)
  return y.reshape(*lead, *w.shape[in_dims:])


def linear_t(w: jax.Array, xt: jax.Array, in_dims: int = 1) -> jax.Array:
  """Feature-major linear map: w [O..., I...] (torch's layout) times xt [I..., M] -> [O..., M].
  The transformer keeps its activations as [D, M] (M = B*T tokens) so that the weight is the
  matmul's left operand: with few tokens (a streaming step has 2 per session) XLA:CPU runs
  W @ X^T about 1.4x faster than X @ W, which repacks the whole weight on every call."""
  n_out = w.ndim - in_dims
  y = w.reshape(int(np.prod(w.shape[:n_out])), -1) @ xt.reshape(-1, xt.shape[-1])
  return y.reshape(*w.shape[:n_out], xt.shape[-1])


def layer_norm_t(p, xt, eps=1e-5):
  """LayerNorm over the feature axis of xt [D, M]."""
  mean = xt.mean(0, keepdims=True)
  var = jnp.square(xt - mean).mean(0, keepdims=True)
  return (xt - mean) * jax.lax.rsqrt(var + eps) * p['scale'][:, None] + p['bias'][:, None]


def rope(cfg: MimiConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2i], x[2i+1]) of the last axis. x [..., H], positions int,
  broadcastable to x.shape[:-1] (e.g. [B,T,1] for x [B,T,N,H])."""
  half = cfg.head_dim // 2
  rate = -math.log(cfg.max_period) * 2 / cfg.head_dim
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * rate)
  angle = positions.astype(jnp.float32)[..., None] * freqs  # [..., H/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  xr, xi = x[..., 0::2], x[..., 1::2]  # [..., H/2]
  out = jnp.stack([xr * cos - xi * sin, xr * sin + xi * cos], axis=-1)  # [..., H/2, 2]
  return out.reshape(x.shape)


def _qkv(cfg, p, xt, positions):
  """xt [D, B*T], positions [B,T] -> q, k, v [B,T,N,H] (q and k rotated)."""
  B, T = positions.shape
  qkv = linear_t(p['qkv'], layer_norm_t(p['norm1'], xt))  # PNHD,DM->PNHM [3,N,H,B*T]
  qkv = rearrange(qkv, 'P N H (B T) -> P B T N H', B=B)
  pos = positions[:, :, None]  # [B,T,1]
  return rope(cfg, qkv[0], pos), rope(cfg, qkv[1], pos), qkv[2]


def _attend(q, k, v, visible):
  """q [B,T,N,H], k/v [B,S,N,H], visible [B,T,S] bool -> [B,T,N,H]."""
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) / math.sqrt(q.shape[-1])
  logits = jnp.where(visible[:, None], logits, NEG_INF)
  return jnp.einsum('BNTS,BSNH->BTNH', jax.nn.softmax(logits, axis=-1), v)


def _attend_cache(q, k, v, visible):
  """`_attend` for a streaming step against the ring cache: q [B,T,N,H], k [B,N,H,S],
  v [B,N,S,H], visible [B,T,S] -> [B,T,N,H]. These layouts make both products plain batched
  matmuls over (B,N) with S contiguous; XLA:CPU runs them several times faster than on [B,S,N,H]
  (the step is bound by reading the cache)."""
  q = q.transpose(0, 2, 1, 3)  # [B,N,T,H]
  logits = jnp.einsum('BNTH,BNHS->BNTS', q, k) / math.sqrt(q.shape[-1])
  logits = jnp.where(visible[:, None], logits, NEG_INF)
  out = jnp.einsum('BNTS,BNSH->BNTH', jax.nn.softmax(logits, axis=-1), v)
  return out.transpose(0, 2, 1, 3)  # [B,T,N,H]


def _finish(cfg, p, xt, attn):
  """Residual attention output, then the residual MLP. xt [D,M], attn [B,T,N,H] -> [D,M]."""
  attn_t = rearrange(attn, 'B T N H -> N H (B T)')
  xt = xt + p['layer_scale_1'][:, None] * linear_t(p['out'], attn_t, 2)  # DNH,NHM->DM
  h = jax.nn.gelu(linear_t(p['linear1'], layer_norm_t(p['norm2'], xt)), approximate=False)  # [F,M]
  return xt + p['layer_scale_2'][:, None] * linear_t(p['linear2'], h)  # DF,FM->DM


def forward(cfg: MimiConfig, params, x: jax.Array) -> jax.Array:
  """Batch mode. x [B,T,D] -> [B,T,D]."""
  B, T, _ = x.shape
  C = cfg.context
  nb = -(-T // C)  # query blocks of C steps
  pad = nb * C - T
  pos = jnp.arange(nb * C)
  q_pos = pos.reshape(nb, C)  # [nb,C]
  k_pos = jnp.concatenate([q_pos - C, q_pos], axis=1)  # [nb,2C]: previous block, this block
  delta = q_pos[:, :, None] - k_pos[:, None, :]  # [nb,C,2C]
  visible = (delta >= 0) & (delta < C) & (k_pos[:, None, :] >= 0)  # [nb,C,2C]
  visible = jnp.broadcast_to(visible[None], (B, nb, C, 2 * C)).reshape(B * nb, C, 2 * C)
  positions = jnp.broadcast_to(pos[:T], (B, T))
  xt = rearrange(x, 'B T D -> D (B T)')  # feature-major, see linear_t
  for p in params['layers']:
    q, k, v = _qkv(cfg, p, xt, positions)  # [B,T,N,H] each

    def blocks(a):  # [B,T,N,H] -> [B*nb,C,N,H]
      a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
      return a.reshape(B * nb, C, *a.shape[2:])

    def with_previous(a):  # [B,T,N,H] -> [B*nb,2C,N,H]
      a = jnp.pad(a, ((0, 0), (C, pad), (0, 0), (0, 0))).reshape(B, nb + 1, C, *a.shape[2:])
      return jnp.concatenate([a[:, :-1], a[:, 1:]], axis=2).reshape(B * nb, 2 * C, *a.shape[3:])

    attn = _attend(blocks(q), with_previous(k), with_previous(v), visible)  # [B*nb,C,N,H]
    attn = rearrange(attn, '(B nb) C N H -> B (nb C) N H', B=B)[:, :T]
    xt = _finish(cfg, p, xt, attn)
  return rearrange(xt, 'D (B T) -> B T D', B=B)


def init_state(cfg: MimiConfig, batch: int, dtype=jnp.float32):
  """Ring KV cache per layer (k [B,N,H,context], v [B,N,context,H]: the layouts `_attend_cache`
  wants) and the stream offset [B] (steps written)."""
  B, N, H, C = batch, cfg.num_heads, cfg.head_dim, cfg.context
  layers = [
    {'k': jnp.zeros((B, N, H, C), dtype), 'v': jnp.zeros((B, N, C, H), dtype)}
    for _ in range(cfg.num_layers)
  ]
  return {'layers': layers, 'offset': jnp.zeros((batch,), jnp.int32)}


def step(cfg: MimiConfig, params, state, x: jax.Array):
  """Streaming mode. x [B,T,D] (T new steps, T <= context) -> (y [B,T,D], new state)."""
  B, T, _ = x.shape
  cap = cfg.context
  offset = state['offset']  # [B]
  positions = offset[:, None] + jnp.arange(T)  # [B,T]
  write = positions % cap  # [B,T] ring slots written now
  # Position held by each ring slot after the write (-1: never written), as RingKVCache computes.
  last = offset + T - 1  # [B]
  delta = jnp.arange(cap)[None, :] - (last % cap)[:, None]  # [B,cap]
  k_pos = jnp.where(delta <= 0, last[:, None] + delta, last[:, None] + delta - cap)  # [B,cap]
  k_pos = jnp.where(jnp.arange(cap)[None, :] >= (offset + T)[:, None], -1, k_pos)
  d = positions[:, :, None] - k_pos[:, None, :]  # [B,T,cap]
  visible = (k_pos[:, None, :] >= 0) & (d >= 0) & (d < cap)
  # Scatter indices broadcasting to [B,T,N]: v[b, n, write[b,t]] = v_new[b,t,n], and for k the
  # same slot along its last axis (advanced indices split by a slice go first: k_new is [B,T,N,H]).
  b, n, w = jnp.arange(B)[:, None, None], jnp.arange(cfg.num_heads)[None, None], write[:, :, None]
  layers = []
  xt = rearrange(x, 'B T D -> D (B T)')  # feature-major, see linear_t
  for p, kv in zip(params['layers'], state['layers']):
    q, k, v = _qkv(cfg, p, xt, positions)  # [B,T,N,H]
    kv = {'k': kv['k'].at[b, n, :, w].set(k), 'v': kv['v'].at[b, n, w].set(v)}
    xt = _finish(cfg, p, xt, _attend_cache(q, kv['k'], kv['v'], visible))
    layers.append(kv)
  return rearrange(xt, 'D (B T) -> B T D', B=B), {'layers': layers, 'offset': offset + T}

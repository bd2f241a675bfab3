"""Pure functions shared by the model, the decoder and the kernels' references.

The einsum letters, one meaning each in flmjax/model, kernels/ and flmjax/model/loss.py:
  L layers          B batch (the rows of a decode step)   R rows: B·T flattened
  T query time      S key time / cache positions              Z grid channels (1 + 2C)
  D model dim       N query heads     K KV heads           G = N // K query heads per KV head
  H head dim        F MLP dim         V text vocab         C codebooks (= depth positions)
  A audio vocab     depth transformer, lowercase: d dim, h heads, e head dim, n = h·e,
                    f MLP dim, s the q/k/v split, l a lane block (Pallas kernels)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """x [..., D]. Normalised in float32, cast back, then scaled (the official order)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * weight.astype(x.dtype)


def rope_tables(
  positions: jax.Array, head_dim: int, theta: float, dtype
) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] -> cos, sin [B, T, H]; computed in float32, rotate-half layout."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, heads, H]; cos/sin [B, T, H]. The first half pairs with the second half."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def gqa_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_major: bool = False
) -> jax.Array:
  """q [B,T,N,H], k/v [B,S,K,H] ([B,K,S,H] if kv_major: the decode cache's layout), mask
  [B,T,S] (True = attend) -> [B,T,N,H].

  Query head n reads KV head n // G, as HF's repeat_kv does. Softmax in float32.
  """
  b, t, n, h = q.shape
  kv = k.shape[1 if kv_major else 2]
  kv_dims = 'BKSH' if kv_major else 'BSKH'
  q = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum(f'BTKGH,{kv_dims}->BKGTS', q, k, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  # A decoded frame (T=1): BKGTH is BTKGH, and XLA:CPU's fast dot takes that order (probs as the
  # left operand); 'BTKGH' made it V^T·P, an Eigen dot 5x slower (RESULTS.md, issue 26).
  out_dims = 'BKGTH' if t == 1 else 'BTKGH'
  out = jnp.einsum(f'BKGTS,{kv_dims}->{out_dims}', probs, v)
  return out.reshape(b, t, n, h)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """x [..., D], gate/up [D, F], down [F, D]: down(silu(gate x) * up x)."""
  g = jnp.einsum('...D,DF->...F', x, gate)
  u = jnp.einsum('...D,DF->...F', x, up)
  return jnp.einsum('...F,FD->...D', jax.nn.silu(g) * u, down)

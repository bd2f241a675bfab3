"""Memory-efficient causal attention (flmjax/model/attention.py) against the plain reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flmjax import sharding as shd
from flmjax.model import attention

F32_TOL = 1e-6  # float32, max |ours - plain| (the paths compute the same rows in another order)
BF16_TOL = 2e-2  # bf16 inputs vs the float32 result: bf16's 8-bit mantissa, max abs error


def _qkv(b=2, t=100, n=4, kv_heads=2, h=16, seed=0):
  """q [B,T,N,H], k/v [B,T,K,H] float32."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shapes = ((b, t, n, h), (b, t, kv_heads, h), (b, t, kv_heads, h))
  return tuple(jax.random.normal(key, s, jnp.float32) for key, s in zip(keys, shapes))


def test_chunked_equals_plain_values_and_grads():
  q, k, v = _qkv()  # 100 frames in blocks of 32: the last block is padded
  chunked = jax.jit(lambda q, k, v: attention.chunked(q, k, v, block=32))
  np.testing.assert_allclose(chunked(q, k, v), attention.plain(q, k, v), atol=F32_TOL, rtol=0)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(q))  # a non-trivial cotangent
  got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(attention.plain), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_chunked_is_causal():
  q, k, v = _qkv(t=40)
  base = attention.chunked(q, k, v, block=16)
  later = k.at[:, 30:].set(7.0), v.at[:, 30:].set(-3.0)  # only frames >= 30 may change
  out = attention.chunked(q, *later, block=16)
  np.testing.assert_array_equal(out[:, :30], base[:, :30])
  assert not np.allclose(out[:, 30:], base[:, 30:])


def test_golden_parity_through_the_chunked_path(tiny_model, tiny_dir, monkeypatch):
  """The official forward (float32, 1e-5 relative) with attention in blocks of 4 frames."""
  r = dict(np.load(tiny_dir / 'forward.npz'))
  assert r['text'].shape[1] > 4
  monkeypatch.setattr(attention, 'BLOCK', 4)
  out = nnx.jit(lambda m, *a: m(*a))(
    tiny_model, r['text'], r['speak'], r['listen'], r['depth_tokens'][..., :-1]
  )
  for name in ('hidden', 'text_logits', 'depth_logits'):
    ours, ref = np.asarray(getattr(out, name), np.float64), r[name]
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5, name


def test_bf16_against_float32():
  q, k, v = _qkv()
  want = attention.plain(q, k, v)
  got = attention.chunked(*(x.astype(jnp.bfloat16) for x in (q, k, v)), block=32)
  assert got.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < BF16_TOL


def test_auto_picks_the_platform_of_the_context_mesh(monkeypatch):
  calls = []
  for name in ('splash', 'cudnn', 'chunked'):
    monkeypatch.setattr(attention, name, lambda *a, name=name, **k: calls.append(name) or a[0])
  q, k, v = _qkv(t=8)
  attention.causal_attention(q, k, v)
  with jax.sharding.use_abstract_mesh(shd.make_mesh(2, 2, 2).abstract_mesh):
    attention.causal_attention(q, k, v)
  assert calls == ['chunked', 'chunked']  # CPU devices, with or without a mesh in context
  with pytest.raises(ValueError, match="unknown impl 'flash'"):
    attention.causal_attention(q, k, v, impl='flash')


def test_splash_interpret_equals_plain():
  """The TPU path (splash, Pallas interpret mode on CPU), 200 frames padded to 256."""
  q, k, v = _qkv(b=1, t=200, n=2, kv_heads=1, h=128)
  got = attention.splash(q, k, v, interpret=True)
  np.testing.assert_allclose(got, attention.plain(q, k, v), atol=1e-5, rtol=0)

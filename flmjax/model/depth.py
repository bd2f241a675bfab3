"""The depth transformer ("DepthGPT"): emits a frame's C speech codebooks one after another.

Step c reads `wtes[c](prev) + wpe[c] + linear_in(h)[c]`, where prev is EMP at c = 0 and the code
of codebook c-1 otherwise. Every step has its own SwiGLU MLP and output head.
Shape letters as in layers.py: R rows (B·T; B when stepping), C codebooks (= depth positions),
S cache positions, lowercase d/h/e/f the depth dim, heads, head dim and MLP dim, A audio vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.model import layers
from flmjax.model.params import is_split, loop_layers, param, unrolled_layers, values
from flmjax.model.weights import dense, fold, rows

LAYER_PARAMS = ('ln_1', 'qkv', 'proj', 'ln_2', 'gate', 'up', 'down')

# Logical axes of the teacher-forced activations, rows R = B*T over the batch mesh axes.
RCD = ('activation_batch', None, 'activation_embed')
CRF = (None, 'activation_batch', 'activation_depth_mlp')


def init_cache(cfg: ModelConfig, batch: int, dtype=None, per_layer: bool = False) -> dict:
  """KV cache over the C depth positions: {'k','v'}: [Ld, B, C, h, e]. per_layer (the split
  frame's, see `layer`): {'k','v'}: tuples of Ld [B, h, C, e], heads before positions."""
  dtype = dtype or cfg.compute_dtype
  C, h, e = cfg.num_codebooks, cfg.depth_heads, cfg.depth_head_dim
  if per_layer:
    layer = lambda: tuple(jnp.zeros((batch, h, C, e), dtype) for _ in range(cfg.depth_layers))
    return {'k': layer(), 'v': layer()}
  shape = (cfg.depth_layers, batch, C, h, e)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def _attend(q, k, v, k_cache, v_cache, start, heads_major: bool):
  """q, k, v [R,C',h,e] at positions start..start+C'-1: k, v written into the caches, then each
  position attends positions s <= it -> (att [R,C',h,e], k_cache, v_cache). Caches [R,S,h,e], or
  [R,h,S,e] if heads_major (the split frame's: the batched dots' operands as stored, where
  XLA:CPU transposed [R,S,h,e] caches into copies at every codebook step and layer)."""
  axis, kv = (2, 'RhSe') if heads_major else (1, 'RShe')
  put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
    cache, (jnp.swapaxes(new, 1, 2) if heads_major else new).astype(cache.dtype), start, axis
  )
  k_cache, v_cache = put(k_cache, k), put(v_cache, v)
  # Logits rounded to the compute dtype, then a float32 softmax (the official order, which the
  # Pallas kernels reproduce).
  logits = jnp.einsum(f'RChe,{kv}->RhCS', q, k_cache).astype(jnp.float32) * (q.shape[-1] ** -0.5)
  positions = start + jnp.arange(q.shape[1])
  visible = jnp.arange(k_cache.shape[axis])[None, :] <= positions[:, None]  # [C',S]
  logits = jnp.where(visible, logits, layers.NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
  return jnp.einsum(f'RhCS,{kv}->RChe', probs, v_cache), k_cache, v_cache


def layer(
  p: dict,
  x: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  start: jax.Array,
  eps: float,
  dropout=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One depth layer at the C' consecutive positions start..start+C'-1 of R rows: the one
  implementation behind the teacher-forced pass (C' = C from 0, on an empty cache) and the
  decoder's step (C' = 1).

  p: one layer's params ('ln_1' [d], 'qkv' [3,d,n], 'proj' [h,e,d], 'ln_2' [d],
  'gate'/'up' [C,d,f], 'down' [C,f,d]); x [R,C',d]; k_cache/v_cache [R,S,h,e] over the S = C
  positions. The new keys are written at their positions, position c attends positions s <= c and
  runs MLP c. Returns (x [R,C',d], k_cache, v_cache). A weight of p may be a LoraWeight or an
  Int8Weight (flmjax.model.weights); `dropout` (key, rate) is the adapters' in training.
  Split weights (split_leading, plain arrays; the decoder on CPU): 'qkv' is a tuple of three
  [d,n] buffers and 'gate'/'up'/'down' tuples of C per-codebook ones; the caches are then
  [R,h,S,e] (init_cache(per_layer=True)).
  """
  split = is_split(p['qkv'])
  rows, width, _ = x.shape
  heads, head_dim = (k_cache.shape[1], k_cache.shape[3]) if split else k_cache.shape[-2:]
  y = layers.rms_norm(x, p['ln_1'], eps)
  if split:  # a [d,n] dot each: a [3,d,n] weight's free axes s, n are apart, so XLA:CPU relaid it
    q, k, v = (
      jnp.einsum('RCd,dn->RCn', y, w).reshape(rows, width, heads, head_dim) for w in p['qkv']
    )
  else:
    qkv = dense('RCd,sdn->sRCn', y, p['qkv'], dropout)  # [3,R,C',n]
    q, k, v = qkv.reshape(3, rows, width, heads, head_dim)  # each [R,C',h,e]
  att, k_cache, v_cache = _attend(q, k, v, k_cache, v_cache, start, split)
  if split:  # one contracted axis n = h·e: over (h, e), XLA:CPU relaid the weight for the dot
    n = heads * head_dim
    x = x + jnp.einsum('RCn,nd->RCd', att.reshape(rows, width, n), p['proj'].reshape(n, -1))
  else:
    x = x + dense('RChe,hed->RCd', att, p['proj'], dropout)
  y = layers.rms_norm(x, p['ln_2'], eps)
  mlp = lambda w: jax.lax.dynamic_slice_in_dim(w, start, width, 0)  # [C',d,f] / [C',f,d]
  take = lambda w: jax.tree.map(mlp, w)  # the slice of a weight and of its adapters/scale
  if split:  # one buffer per codebook (split_leading): start is a Python int
    take = lambda w: w[start][None]
  # Codebook-major inside the MLP: the matmuls are batched over C, which XLA wants leading, so
  # only the d-wide in and out are transposed, never the f-wide activations.
  y = jnp.swapaxes(y, 0, 1)  # [C',R,d]
  linear = lambda spec, x, name: dense(spec, x, take(p[name]), dropout)
  g = shd.constrain(linear('CRd,Cdf->CRf', y, 'gate'), CRF)
  u = shd.constrain(linear('CRd,Cdf->CRf', y, 'up'), CRF)
  x = x + jnp.swapaxes(linear('CRf,Cfd->CRd', jax.nn.silu(g) * u, 'down'), 0, 1)
  return x, k_cache, v_cache


def layer_step(
  p: dict, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, c: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`layer` at the one position c for B rows: x [B,d], caches [B,C,h,e], c a scalar int.

  Returns (x [B,d], k_cache, v_cache). This is the reference the Pallas kernels must match.
  """
  x, k_cache, v_cache = layer(p, x[:, None], k_cache, v_cache, c, eps)
  return x[:, 0], k_cache, v_cache


# A depth KV cache as layers_step takes it: stacked [L,B,C,h,e], or L per-layer [B,C,h,e] arrays.
Caches = jax.Array | tuple[jax.Array, ...]


def layers_step(
  p: dict,
  x: jax.Array,
  k_cache: Caches,
  v_cache: Caches,
  c: jax.Array,
  eps: float,
  layer_fn=layer_step,
) -> tuple[jax.Array, Caches, Caches]:
  """All L layers at position c: p's leaves stacked [L,...], caches [L,B,C,h,e]; scans layer_fn."""

  def layer(x, xs):
    lp, ck, cv = xs
    x, ck, cv = layer_fn(lp, x, ck, cv, c, eps)
    return x, (ck, cv)

  if is_split(p['qkv']):  # separate per-layer buffers (split_leading): unrolled, read in place
    ks, vs = [], []  # caches given as per-layer tuples (frame.py) stay so: no stacking copies
    for i in range(len(k_cache)):
      x, ck, cv = layer_fn({n: w[i] for n, w in p.items()}, x, k_cache[i], v_cache[i], c, eps)
      ks.append(ck)
      vs.append(cv)
    if isinstance(k_cache, tuple):
      return x, tuple(ks), tuple(vs)
    return x, jnp.stack(ks), jnp.stack(vs)
  x, (k_cache, v_cache) = jax.lax.scan(layer, x, (p, k_cache, v_cache))
  return x, k_cache, v_cache


class DepthTransformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, C, D, d, h, e, f, A = (
      cfg.depth_layers,
      cfg.num_codebooks,
      cfg.hidden_size,
      cfg.depth_dim,
      cfg.depth_heads,
      cfg.depth_head_dim,
      cfg.padded_depth_mlp_dim,
      cfg.audio_vocab_size,
    )
    f_real = cfg.depth_mlp_dim  # units past it are zeros: silu(0) * 0 adds nothing
    p = lambda shape, axes, init='normal', real=None: param(
      rngs, shape, axes, cfg.weight_dtype, init, cfg.initializer_range, real
    )
    self.linear_in = p((D, C, d), ('embed', 'codebook', 'depth_embed'))
    self.wtes = p((C, A, d), ('codebook', 'audio_vocab', 'depth_embed'))
    self.wpe = p((C, d), ('codebook', 'depth_embed'))
    self.ln_1 = p((L, d), ('layers', 'norm'), 'ones')
    # q|k|v [3,d,n] with n = h*e: lanes last, so TPUs store it row-major (not so [d,3,h,e]) and
    # the Pallas kernel reads it in place.
    self.qkv = p((L, 3, d, h * e), ('layers', 'qkv', 'depth_embed', 'depth_heads'))
    self.proj = p((L, h, e, d), ('layers', 'depth_heads', 'head_dim', 'depth_embed'))
    self.ln_2 = p((L, d), ('layers', 'norm'), 'ones')
    self.gate = p(
      (L, C, d, f), ('layers', 'codebook', 'depth_embed', 'depth_mlp'), real=(L, C, d, f_real)
    )
    self.up = p(
      (L, C, d, f), ('layers', 'codebook', 'depth_embed', 'depth_mlp'), real=(L, C, d, f_real)
    )
    self.down = p(
      (L, C, f, d), ('layers', 'codebook', 'depth_mlp', 'depth_embed'), real=(L, C, f_real, d)
    )
    self.ln_f = p((d,), ('norm',), 'ones')
    self.heads = p((C, d, A), ('codebook', 'depth_embed', 'audio_vocab'))

  def conditioning(self, h: jax.Array, dropout=None) -> jax.Array:
    """h [..., D] -> [..., C, d]: conditioning vector c is added to depth step c's input."""
    return dense('...D,DCd->...Cd', h, values(self, ('linear_in',), h.dtype)['linear_in'], dropout)

  def __call__(self, h: jax.Array, prev: jax.Array, remat_policy=None) -> jax.Array:
    """Teacher-forced: h [B,T,D], prev [B,T,C-1] (codes of codebooks 0..C-2) -> [B,T,C,A]."""
    return self.logits(self.features(h, prev, remat_policy))

  def features(self, h: jax.Array, prev: jax.Array, remat_policy=None, dropout=None) -> jax.Array:
    """Teacher-forced final-normed states: h [B,T,D], prev [B,T,C-1] -> [B,T,C,d]; the loss
    applies the heads itself, a codebook at a time (loss.audio_cross_entropy).
    `dropout` (key, rate): adapter dropout in training, a stream per layer."""
    cfg, dt = self.cfg, h.dtype
    b, t, _ = h.shape
    C = cfg.num_codebooks
    tokens = jnp.concatenate([jnp.full((b, t, 1), cfg.audio_emp_id, prev.dtype), prev], axis=-1)
    # wtes gathered: see Backbone.embed
    wtes = values(self, ('wtes',), dt)['wtes']
    pin = lambda x: shd.constrain(x, (None,) * 3)
    x = rows(wtes, (jnp.arange(C), tokens), dt, pin) + self.wpe[...].astype(dt)
    cond = self.conditioning(h, fold(dropout, cfg.depth_layers))  # after the layers' streams
    x = shd.constrain((x + cond).reshape(b * t, C, cfg.depth_dim), RCD)  # [R,C,d]
    empty = jnp.zeros((b * t, C, cfg.depth_heads, cfg.depth_head_dim), dt)  # [R,S,h,e]

    def body(x, xs):
      p, i = xs
      return layer(
        p,
        shd.constrain(x, RCD),
        empty,
        empty,
        0,
        cfg.depth_rms_eps,
        fold(dropout, i),
      )[0], None

    unrolled = unrolled_layers()  # on CPU: see params.unrolled_layers
    if remat_policy is not None:  # prevent_cse=False is safe inside a scan only
      body = jax.checkpoint(body, policy=remat_policy, prevent_cse=unrolled)
    x = loop_layers(body, x, values(self, LAYER_PARAMS, dt), cfg.depth_layers, unrolled)
    x = layers.rms_norm(x, self.ln_f[...].astype(dt), cfg.depth_rms_eps)
    return x.reshape(b, t, C, cfg.depth_dim)

  def logits(self, x: jax.Array) -> jax.Array:
    """x [B,T,C,d] -> [B,T,C,A]."""
    b, t, C, d = x.shape
    logits = shd.constrain(
      dense('RCd,CdA->RCA', x.reshape(b * t, C, d), values(self, ('heads',), x.dtype)['heads']),
      ('activation_batch', None, None),
    )
    return logits.reshape(b, t, C, self.cfg.audio_vocab_size)

  def step(
    self,
    cond: jax.Array,
    prev: jax.Array,
    c: jax.Array,
    cache: dict,
    layer_fn=layer_step,
    layers_fn=None,
  ) -> tuple[jax.Array, dict]:
    """One depth position for B rows: cond [B,C,d], prev [B] -> logits [B,A], new cache.

    `layer_fn` has `layer_step`'s signature; the decoder passes a Pallas kernel here.
    `layers_fn`, if given, replaces the whole layer stack: it has `layers_step`'s signature
    (stacked params, so a kernel can read each layer's weights in place).
    """
    cfg = self.cfg
    dt = cond.dtype
    emb = jax.lax.dynamic_index_in_dim(self.wtes[...], c, 0, keepdims=False)[prev].astype(dt)
    pos = jax.lax.dynamic_index_in_dim(self.wpe[...], c, 0, keepdims=False).astype(dt)
    x = emb + pos + jax.lax.dynamic_index_in_dim(cond, c, 1, keepdims=False)
    layers_fn = layers_fn or functools.partial(layers_step, layer_fn=layer_fn)
    x, ck, cv = layers_fn(
      values(self, LAYER_PARAMS, dt), x, cache['k'], cache['v'], c, cfg.depth_rms_eps
    )
    x = layers.rms_norm(x, self.ln_f[...].astype(dt), cfg.depth_rms_eps)
    heads = values(self, ('heads',), dt)['heads']
    if is_split(heads):  # one buffer per codebook (split_leading): c is a Python int
      head = heads[c]
    else:
      head = jax.lax.dynamic_index_in_dim(heads, c, 0, keepdims=False)
    return jnp.einsum('Bd,dA->BA', x, head), {'k': ck, 'v': cv}

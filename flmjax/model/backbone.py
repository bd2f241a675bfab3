"""The temporal transformer: 17-stream embedding sum, Qwen2-style GQA decoder, text head.

Layers are stacked on a leading 'layers' axis and run with `jax.lax.scan`, so compile time does
not grow with depth and the KV cache is one array per tensor kind. Split weights
(flmjax.model.params.split_leading) run the layers unrolled, over a stacked cache or a per-layer
one (init_cache(per_layer=True)); so do teacher-forced passes on CPU, over the stacked weights
parted by a split (flmjax.model.params.unrolled_layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.model import attention, layers, paged
from flmjax.model.params import is_split, loop_layers, param, unrolled_layers, values
from flmjax.model.weights import dense, fold, rows

LAYER_PARAMS = (
  'input_norm',
  'q',
  'q_bias',
  'k',
  'k_bias',
  'v',
  'v_bias',
  'o',
  'post_norm',
  'gate',
  'up',
  'down',
)

# {'k': [L,B,K,S,H], 'v': [L,B,K,S,H]}; entry s holds position s (mod S). Heads before time: a
# layer's [B,K,S,H] slice is what the one-frame attention's batched matmuls read as stored (with
# [L,B,S,K,H], XLA transposed every layer's whole cache into a copy on every frame). Per layer:
# {'k': L arrays [B,K,S,H], 'v': likewise}, for the unrolled layers of split weights: XLA:CPU's
# dot reads only whole buffers, so a stacked cache's layer slice was copied on every frame.
Cache = dict
CACHE_AXES = ('layers', 'batch', 'kv_heads', 'time', 'head_dim')  # logical axes of each

# Logical axes of the activations pinned at layer boundaries (see flmjax.sharding.constrain).
BTD = ('activation_batch', 'activation_length', 'activation_embed')
BTC_D = ('activation_batch', 'activation_length', 'embed_codebook', None)  # looked-up audio rows
BTNH = ('activation_batch', 'activation_length', 'activation_heads', None)
BTKH = ('activation_batch', 'activation_length', 'activation_kv_heads', None)


def init_cache(
  cfg: ModelConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False
) -> Cache:
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  if per_layer:
    layer = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return {'k': layer(), 'v': layer()}
  shape = (cfg.num_layers, *shape)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


class Backbone(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, N, K, H, F = (
      cfg.num_layers,
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.intermediate_size,
    )
    C, A, V, Vp, dt, std = (
      cfg.num_codebooks,
      cfg.audio_vocab_size,
      cfg.vocab_size,
      cfg.padded_vocab_size,
      cfg.weight_dtype,
      cfg.initializer_range,
    )
    p = lambda shape, axes, init='normal', real=None: param(rngs, shape, axes, dt, init, std, real)
    self.text_embed = p((Vp, D), ('vocab', 'embed'), real=(V, D))
    self.speak_embed = p((C, A, D), ('embed_codebook', 'audio_vocab', 'embed'))
    self.listen_embed = p((C, A, D), ('embed_codebook', 'audio_vocab', 'embed'))
    self.input_norm = p((L, D), ('layers', 'norm'), 'ones')
    self.q = p((L, D, N, H), ('layers', 'embed', 'q_heads', 'head_dim'))
    self.q_bias = p((L, N, H), ('layers', 'q_heads', 'head_dim'), 'zeros')
    self.k = p((L, D, K, H), ('layers', 'embed', 'kv_heads', 'head_dim'))
    self.k_bias = p((L, K, H), ('layers', 'kv_heads', 'head_dim'), 'zeros')
    self.v = p((L, D, K, H), ('layers', 'embed', 'kv_heads', 'head_dim'))
    self.v_bias = p((L, K, H), ('layers', 'kv_heads', 'head_dim'), 'zeros')
    self.o = p((L, N, H, D), ('layers', 'q_heads', 'head_dim', 'embed'))
    self.post_norm = p((L, D), ('layers', 'norm'), 'ones')
    self.gate = p((L, D, F), ('layers', 'embed', 'mlp'))
    self.up = p((L, D, F), ('layers', 'embed', 'mlp'))
    self.down = p((L, F, D), ('layers', 'mlp', 'embed'))
    self.final_norm = p((D,), ('norm',), 'ones')
    self.lm_head = p((D, Vp), ('embed', 'vocab'), real=(D, V))

  def embed(
    self, text: jax.Array, speak: jax.Array, listen: jax.Array, gather_tables: bool = True
  ) -> jax.Array:
    """text [B,T], speak/listen [B,T,C] -> [B,T,D]: the sum of 1 + 2C embeddings, times muP.

    gather_tables=False (decoding: B·T rows, far fewer than the tables') leaves the tables as
    they are stored and lets XLA move the looked-up rows instead.
    """
    dt = self.cfg.compute_dtype
    codebooks = jnp.arange(self.cfg.num_codebooks)
    # FSDP: the tables' embed dim is gathered (in dt) so the lookups stay local to each batch
    # shard; otherwise the token ids and looked-up rows would cross the batch shards.
    pin = lambda axes: (lambda x: shd.constrain(x, axes)) if gather_tables else None
    # Decoding: the audio rows stay split by codebook as their tables are, so each chip sums its
    # own codebooks and one [B,T,D] all-reduce follows (gathered, [B,T,C,D] was C times larger).
    by_codebook = lambda r: r if gather_tables else shd.constrain(r, BTC_D)
    w = values(self, ('text_embed', 'speak_embed', 'listen_embed'), dt)
    audio = lambda name, ids: by_codebook(
      rows(w[name], (codebooks, ids), dt, pin((None,) * 3))
    ).sum(axis=2)
    x = rows(w['text_embed'], (text,), dt, pin(('vocab', None)))
    x = x + audio('speak_embed', speak) + audio('listen_embed', listen)
    return x * jnp.asarray(self.cfg.embed_scale, dt)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache: Cache | None = None,
    remat_policy=None,
    dropout=None,
  ) -> tuple[jax.Array, Cache | None]:
    """x [B,T,D] embedded frames, positions [B,T] -> final-normed hidden [B,T,D], new cache.
    `dropout` (key, rate): adapter dropout in training (flmjax.model.weights.dense), a stream per
    layer.

    Without a cache (teacher forcing) attention is causal over the T frames, through
    attention.causal_attention; `positions` only place RoPE. With one, the step's keys are
    written at entries `positions` (mod S) and every entry s <= position is attended.
    """
    cfg = self.cfg
    stacked = values(self, LAYER_PARAMS, cfg.compute_dtype)
    split = is_split(stacked['q'])  # per-layer buffers (split_leading): unrolled, read in place
    cos, sin = layers.rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.compute_dtype)
    paged_cache = cache is not None and 'table' in cache
    if paged_cache:  # a one-frame step over a paged pool (flmjax.model.paged)
      pool = {n: cache[n] for n in paged.POOL_NAMES if n in cache}
      pages, page_size = cache['pages'], pool['k'].shape[2]
      pos = positions[:, 0]
      count = paged.counts(pos, cache['held'], page_size)
    elif cache is not None:
      entries = jnp.arange(jax.tree.leaves(cache['k'])[0].shape[-2])  # S, stacked or per layer
      mask = entries[None, None, :] <= positions[:, :, None]  # [B,T,S]

    def layer(carry, xs):
      # The whole cache [L,B,K,S,H] rides in the carry so each step updates it in place (as scan
      # xs/ys, XLA copied the full cache several times per decoded frame).
      x, kv = carry
      p, i = xs
      linear = lambda spec, x, w: dense(spec, x, w, fold(dropout, i))
      x = shd.constrain(x, BTD)
      h = layers.rms_norm(x, p['input_norm'], cfg.rms_norm_eps)
      q = shd.constrain(linear('BTD,DNH->BTNH', h, p['q']) + p['q_bias'], BTNH)
      k = shd.constrain(linear('BTD,DKH->BTKH', h, p['k']) + p['k_bias'], BTKH)
      v = shd.constrain(linear('BTD,DKH->BTKH', h, p['v']) + p['v_bias'], BTKH)
      q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
      if kv is None:
        att = attention.causal_attention(q, k, v)
      elif paged_cache:
        page, slot = paged.locate(
          pos, cache['table'], cache['held'], i, pages, page_size, cache['writes']
        )
        kv = paged.write(paged.write(kv, 'k', k[:, 0], page, slot), 'v', v[:, 0], page, slot)
        kv = paged.constrain(kv)
        att = paged.attend(q, kv, cache, i * pages, count)
      else:
        kv, att = _cached_attention(kv, q, k, v, i, positions, mask)
      att = shd.constrain(att, BTNH)
      x = shd.constrain(x + _out_proj(linear, att, p['o'], split), BTD)
      h = layers.rms_norm(x, p['post_norm'], cfg.rms_norm_eps)
      g, u = linear('BTD,DF->BTF', h, p['gate']), linear('BTD,DF->BTF', h, p['up'])  # SwiGLU
      x = x + shd.constrain(linear('BTF,FD->BTD', jax.nn.silu(g) * u, p['down']), BTD)
      return (x, kv), None

    unrolled = split or (cache is None and unrolled_layers())  # teacher forcing on CPU
    if remat_policy is not None:  # prevent_cse=False is safe inside a scan only
      layer = jax.checkpoint(layer, policy=remat_policy, prevent_cse=unrolled)
    kv = None
    if cache is not None:
      kv = pool if paged_cache else {'k': cache['k'], 'v': cache['v']}
    carry = (x.astype(cfg.compute_dtype), kv)
    x, kv = loop_layers(layer, carry, stacked, cfg.num_layers, unrolled, split)
    h = layers.rms_norm(x, self.final_norm[...].astype(cfg.compute_dtype), cfg.rms_norm_eps)
    return shd.constrain(h, BTD), kv

  def text_logits(self, h: jax.Array, padded: bool = False, dropout=None) -> jax.Array:
    """h [B,T,D] -> [B,T,V], with the muP output scale; padded=True gives the padded vocab
    [B,T,Vp] with the padding's logits at NEG_INF (what the chunked loss reads)."""
    cfg = self.cfg
    logits = dense('BTD,DV->BTV', h, values(self, ('lm_head',), h.dtype)['lm_head'], dropout)
    logits = shd.constrain(logits, ('activation_batch', 'activation_length', 'activation_vocab'))
    logits = logits * jnp.asarray(cfg.text_logit_scale, logits.dtype)
    if not padded:
      return logits[..., : cfg.vocab_size]
    if cfg.padded_vocab_size == cfg.vocab_size:  # no padding to mask (a select fwd and bwd)
      return logits
    real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    return jnp.where(real, logits, jnp.asarray(layers.NEG_INF, logits.dtype))


def _out_proj(linear, att: jax.Array, o, split: bool) -> jax.Array:
  """att [B,T,N,H] @ o [N,H,D] -> [B,T,D]. Split (plain per-layer arrays): one contracted axis
  N·H, as o's buffer lies; over (N, H), XLA:CPU relaid o (a copy of the weight every frame)."""
  if not split:
    return linear('BTNH,NHD->BTD', att, o)
  b, t, n, h = att.shape
  return linear('BTn,nD->BTD', att.reshape(b, t, n * h), o.reshape(n * h, -1))


def _cached_attention(kv: Cache, q, k, v, i, positions, mask) -> tuple[Cache, jax.Array]:
  """A one-frame layer i over the contiguous cache: k, v [B,T,K,H] written at entries
  `positions` [B,T], then q [B,T,N,H] attends -> (cache, [B,T,N,H]). A per-layer cache (tuples)
  needs i a Python int (the unrolled layers of split weights): layer i's buffers are written in
  place and read whole."""
  if isinstance(kv['k'], tuple):
    if not isinstance(i, int):
      raise ValueError('a per-layer KV cache needs split weights (params.split_leading)')
    ck, cv = (
      shd.constrain(_write(c[i], new, None, positions), CACHE_AXES[1:])
      for c, new in ((kv['k'], k), (kv['v'], v))
    )
    put = lambda c, new: c[:i] + (new,) + c[i + 1 :]
    kv = {'k': put(kv['k'], ck), 'v': put(kv['v'], cv)}
  else:
    # Pinned as stored: left free, a cache whose KV heads tensor cannot split was gathered.
    ck, cv = (
      shd.constrain(_write(c, new, i, positions), CACHE_AXES)
      for c, new in ((kv['k'], k), (kv['v'], v))
    )
    kv = {'k': ck, 'v': cv}
    ck, cv = ck[i], cv[i]
  return kv, layers.gqa_attention(q, ck, cv, mask, kv_major=True)


def _write(
  cache: jax.Array, new: jax.Array, layer: jax.Array | None, positions: jax.Array
) -> jax.Array:
  """cache [L,B,K,S,H]: new [B,T,K,H] written into layer `layer` at entries positions [B,T]
  (layer None: cache is one layer's [B,K,S,H]).

  Entries are positions mod S, so a one-frame step past the end overwrites the oldest position: the
  decoder's sliding-window policy (once position >= S - 1 the mask attends every entry).
  """
  entries = (positions % cache.shape[-2])[:, None, :]  # [B,1,T]
  rows = jnp.arange(new.shape[0])[:, None, None]
  heads = jnp.arange(new.shape[2])[None, :, None]
  at = (rows, heads, entries) if layer is None else (layer, rows, heads, entries)
  return cache.at[at].set(jnp.swapaxes(new, 1, 2).astype(cache.dtype))

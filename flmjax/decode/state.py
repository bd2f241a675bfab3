"""The streaming decoder's state: a plain pytree with one row per session slot.

Shape letters: B session slots, L layers, K KV heads, S cache positions, H head dim, R ring columns,
Z channels (17), W penalty window, P penalized codebooks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.decode import pages
from flmjax.decode.sampling import SamplingConfig, StreamParams
from flmjax.model import backbone, paged

# Logical axes of the backbone KV cache [L,B,K,S,H] (a per-layer cache's [B,K,S,H] leaves: the
# last four); every other leaf is ('batch', None...).
CACHE_AXES = backbone.CACHE_AXES


def ring_size(cfg: ModelConfig) -> int:
  """Ring columns: a step touches columns offset+1-max_delay .. offset+max_delay."""
  return 2 * cfg.max_delay + 2


def initial_column(cfg: ModelConfig) -> np.ndarray:
  """The official initial tokens [Z]: text WAIT, every audio channel PAD."""
  return np.asarray(cfg.initial_column, np.int32)


def key_data(seeds: jax.Array) -> jax.Array:
  """seeds [B] int -> raw PRNG key data [B, 2]; a session's key depends on its seed only."""
  return jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(seeds)


def init(
  cfg: ModelConfig,
  sampling: SamplingConfig,
  batch: int,
  max_len: int,
  seeds: jax.Array,
  buffers: dict | None = None,
  kv: pages.PagedKV | None = None,
  per_layer: bool = False,
) -> dict:
  """A state whose B slots are all fresh, active sessions. Pure; jit it for large caches.
  buffers: {'text', 'audio'} ring entries of the penalty windows (default: the sampling's
  windows; sessions may use any window up to them). per_layer: the contiguous cache as L
  separate arrays per kind (flmjax.model.backbone.init_cache; the split-weights frame).

  Leaves:
    cache: {'k','v'} [L,B,K,S,H] (per_layer: tuples of L [B,K,S,H]), slot s holds position s
      (s mod S when sliding);
    ring [B,Z,R] int32: the delayed token columns, column j at ring slot j mod R;
    offset [B] int32: the column the next step reads, i.e. the frame index and RoPE position;
    active [B] bool: slots that advance; a free slot's row is computed but never changes;
    text_window [B,Wt], audio_window [B,P,Wa] int32: the last sampled tokens, token of step t at
      slot t mod W;
    keys [B,2] uint32: per-session PRNG key data;
    text, audio: StreamParams of [B] arrays: per-session sampling parameters.
  With kv (a paged cache), 'cache' is the page pool and table, held, free are added
  (flmjax.decode.pages).
  """
  ring = jnp.broadcast_to(
    jnp.asarray(initial_column(cfg))[None, :, None], (batch, cfg.num_channels, ring_size(cfg))
  )
  buffers = buffers or {k: sampling.penalty_buffer(k) for k in ('text', 'audio')}
  cache = (
    {} if kv is not None else {'cache': backbone.init_cache(cfg, batch, max_len, None, per_layer)}
  )
  return {
    **cache,
    **({} if kv is None else pages.init(cfg, kv, batch)),
    'ring': ring,
    'offset': jnp.zeros((batch,), jnp.int32),
    'active': jnp.ones((batch,), bool),
    'text_window': jnp.zeros((batch, buffers['text']), jnp.int32),
    'audio_window': jnp.zeros(
      (batch, max(sampling.penalized_codebooks, 1), buffers['audio']), jnp.int32
    ),
    'keys': key_data(jnp.asarray(seeds, jnp.uint32)),
    'text': sampling.stream('text').per_row(batch),
    'audio': sampling.stream('audio').per_row(batch),
  }


def reset(
  cfg: ModelConfig,
  state: dict,
  mask: jax.Array,
  seeds: jax.Array,
  text: StreamParams,
  audio: StreamParams,
) -> dict:
  """Restarts the slots where mask [B] as fresh, active sessions. Pure.

  Their KV rows are zeroed too: attention masks stale slots anyway, but zeroing keeps even a
  NaN from a previous session out of reach.
  """
  rows = lambda x, new: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), new, x)
  # a stacked cache's [L,B,K,S,H] or a per-layer one's [B,K,S,H] leaves: B is 4th from the end
  kv_rows = lambda x: mask.reshape((1,) * (x.ndim - 4) + (-1, 1, 1, 1))
  kv = lambda x: jnp.where(kv_rows(x), jnp.zeros((), x.dtype), x)
  init_ring = jnp.asarray(initial_column(cfg))[None, :, None]
  if 'table' in state:  # paged: the rows' pages go back to the pool (the session rewrites
    # each entry before it reads it)
    fresh = pages.give_back(state, mask)
  else:
    fresh = {'cache': jax.tree.map(kv, state['cache'])}
  return {
    **state,
    **fresh,
    'ring': rows(state['ring'], init_ring),
    'offset': rows(state['offset'], 0),
    'active': rows(state['active'], True),
    'text_window': rows(state['text_window'], 0),
    'audio_window': rows(state['audio_window'], 0),
    'keys': rows(state['keys'], key_data(jnp.asarray(seeds, jnp.uint32))),
    'text': jax.tree.map(rows, state['text'], text),
    'audio': jax.tree.map(rows, state['audio'], audio),
  }


def release(state: dict, mask: jax.Array) -> dict:
  """Marks the slots where mask [B] free: they stop advancing and return valid=False. A paged
  state's pages return to the pool."""
  if 'table' in state:
    state = pages.give_back(state, mask & state['active'])
  return {**state, 'active': state['active'] & ~mask}


def shardings(state, mesh: jax.sharding.Mesh, rules=shd.RULES):
  """NamedShardings for a state (or its eval_shape): sessions over the batch axes, the KV cache's
  heads over tensor, by the same rules table as the parameters."""

  paged_pool = 'table' in state

  def one(path, x):
    top = getattr(path[0], 'key', None)
    if top == 'cache' and paged_pool:
      axes = paged.POOL_AXES if len(x.shape) == 4 else paged.SCALE_AXES
    elif top == 'cache':
      axes = CACHE_AXES[-len(x.shape) :]
    elif top == 'free':  # the pool's free pages: every shard allocates alike
      axes = (None,)
    else:
      axes = ('batch',) + (None,) * (len(x.shape) - 1)
    return shd.named_sharding(axes, x.shape, mesh, rules)

  return jax.tree_util.tree_map_with_path(one, state)

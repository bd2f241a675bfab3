"""One 80 ms frame of full-duplex decoding for every slot: a pure function, jitted by the decoder.

It follows the official LMGen.step:
1. the user's codes go into the ring at column offset + delay (listen channels);
2. the backbone reads column `offset` with its KV cache (RoPE position = offset);
3. text is sampled (repetition penalty over the session's last text tokens), on the mesh in
   context from vocab-sharded logits that are never gathered;
4. the depth transformer emits the 8 speak codes, one lax.scan step per codebook with a KV cache
   over the depth positions (codebooks < P get the audio repetition penalty);
5. text and speak codes are written at column offset + 1; offset += 1;
6. once offset > max_delay the step returns [text, 8 speak] un-delayed: column
   offset - max_delay + delay[k] for channel k (text/semantic from offset - 1, acoustic from
   offset with the official delays).
Shape letters: B session slots, Z channels, R ring columns, C codebooks, V text vocab, A audio
vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flmjax.decode import pages
from flmjax.decode.sampling import sample, sample_sharded
from flmjax.model import depth
from flmjax.model.flm import FLMAudio
from flmjax.model.params import is_split


def window_valid(offset: jax.Array, window: jax.Array, size: int) -> jax.Array:
  """[B,W]: which ring entries of a penalty window hold one of the last `window` [B] tokens.

  The token of step t sits at entry t mod W, so before step `offset` entry j holds the token of
  (offset - 1 - j) mod W steps ago.
  """
  age = (offset[:, None] - 1 - jnp.arange(size)[None, :]) % size
  return age < jnp.minimum(offset, window)[:, None]


def newest(ring: jax.Array, offset: jax.Array, n: int) -> jax.Array:
  """ring [B,W] (the token of step t at entry t mod W) -> [B,n]: its newest n entries, newest
  first, before step `offset`."""
  at = (offset[:, None] - 1 - jnp.arange(n)[None, :]) % ring.shape[1]
  return jnp.take_along_axis(ring, at, axis=1)


def with_penalty(fn, ring: jax.Array, offset: jax.Array, window: jax.Array, fast: int | None):
  """fn(entries [B,n], valid [B,n]) over a penalty ring [B,W] whose valid entries are each row's
  last min(offset, window [B]) tokens. When every row's window fits in `fast` entries (the
  decoder's own windows) it reads only the newest `fast`: the same tokens, so the same result,
  at the cost of the window in use rather than of the whole ring (which a server sizes to the
  session, so that a session may ask for any window)."""
  W = ring.shape[1]
  whole = lambda: fn(ring, window_valid(offset, window, W))
  if fast is None or fast >= W:
    return whole()
  count = jnp.minimum(offset, window)  # [B] tokens in each row's window
  short = lambda: fn(newest(ring, offset, fast), jnp.arange(fast)[None, :] < count[:, None])
  return jax.lax.cond(jnp.all(count <= fast), short, whole)


def frame(
  model: FLMAudio,
  state: dict,
  user: jax.Array,
  *,
  penalized: int,
  layer_fn=depth.layer_step,
  layers_fn=None,
  fast_windows: tuple[int, int] | None = None,
  kv: pages.PagedKV | None = None,
  span: int = 1,
) -> tuple[dict, jax.Array, jax.Array]:
  """state, user [B,C] int32 -> (state, out [B,1+C] int32, valid [B] bool).

  fast_windows: (text, audio) penalty windows that every session usually fits in (the decoder's
  sampling's); the penalty then reads only that many ring entries (see `penalized`).
  kv: the state's paged cache (None: contiguous); span: the table columns its XLA path reads
  (flmjax.decode.pages.span)."""
  cfg = model.cfg
  C, Z, max_delay = cfg.num_codebooks, cfg.num_channels, cfg.max_delay
  delays = jnp.asarray(cfg.delays, jnp.int32)
  ring, offset, active = state['ring'], state['offset'], state['active']
  B, _, R = ring.shape
  rows = jnp.arange(B)[:, None]
  keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

  # 1. The user's codes at column offset + delay.
  listen = jnp.arange(1 + C, Z)[None, :]
  cols = (offset[:, None] + delays[1 + C :][None, :]) % R  # [B,C]
  ring = ring.at[rows, listen, cols].set(keep(user.astype(jnp.int32), ring[rows, listen, cols]))

  # 2. The backbone on column `offset`.
  column = ring[rows[:, 0], :, offset % R]  # [B,Z]
  x = model.backbone.embed(
    column[:, None, 0], column[:, None, 1 : 1 + C], column[:, None, 1 + C :], gather_tables=False
  )
  if kv is None:
    h, cache = model.backbone(x, offset[:, None], state['cache'])  # h [B,1,D]
  else:  # paged: take this frame's pages, then read the first `span` table columns
    state = pages.take(state, kv.page_size)
    view = {
      **state['cache'],
      'table': state['table'],
      'held': state['held'],
      'writes': active & (state['held'] > 0),
      'read': state['table'][:, :span],
      'pages': kv.pages,
      'impl': kv.impl,
    }
    h, cache = model.backbone(x, offset[:, None], view)
  # The padded vocab (padding at NEG_INF, never drawn) keeps the tensor split of the logits.
  text_logits = model.backbone.text_logits(h, padded=True)[:, 0]  # [B,Vp]

  keys = jax.random.wrap_key_data(state['keys'])  # [B] typed
  next_keys, text_keys, audio_keys = jnp.moveaxis(
    jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0
  )  # each [B]

  # 3. Text.
  fast_text, fast_audio = fast_windows or (None, None)
  text_win = state['text_window']
  text = with_penalty(
    lambda win, valid: sample_sharded(text_keys, text_logits, state['text'], win, valid),
    text_win,
    offset,
    state['text'].penalty_window,
    fast_text,
  )

  # 4. The depth transformer, one scan step per codebook.
  cond = model.depth_transformer.conditioning(h[:, 0])  # [B,C,d]
  audio_win = state['audio_window']  # [B,P,Wa]

  def depth_step(carry, c):
    prev, dcache = carry
    kernel = {} if layers_fn is None else {'layers_fn': layers_fn}
    logits, dcache = model.depth_transformer.step(
      cond, prev, c, dcache, layer_fn=layer_fn, **kernel
    )
    win = jax.lax.dynamic_index_in_dim(
      audio_win, jnp.minimum(c, audio_win.shape[1] - 1), 1, keepdims=False
    )  # [B,Wa]
    code_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(audio_keys, c)
    code = with_penalty(
      lambda win, valid: sample(code_keys, logits, state['audio'], win, valid & (c < penalized)),
      win,
      offset,
      state['audio'].penalty_window,
      fast_audio,
    )
    return (code, dcache), code

  emp = jnp.full((B,), cfg.audio_emp_id, jnp.int32)
  if is_split(model.depth_transformer.heads.get_value()):
    # Per-codebook weight buffers (flmjax.model.params.split_leading): unrolled, so each step's
    # dots read codebook c's weights where they lie; the depth cache per layer too (no slices,
    # no restacking), heads before positions (depth.layer).
    codes, carry = [], (emp, depth.init_cache(cfg, B, cond.dtype, per_layer=True))
    for c in range(C):
      carry, code = depth_step(carry, c)
      codes.append(code)
    audio = jnp.stack(codes, axis=1)  # [B,C]
  else:
    start = (emp, depth.init_cache(cfg, B, cond.dtype))
    _, audio = jax.lax.scan(depth_step, start, jnp.arange(C))
    audio = audio.T  # [B,C]

  # 5. Text and speak at column offset + 1; the penalty windows; offset += 1.
  own = jnp.arange(1 + C)[None, :]
  nxt = jnp.broadcast_to(((offset + 1) % R)[:, None], (B, 1 + C))
  ring = ring.at[rows, own, nxt].set(
    keep(jnp.concatenate([text[:, None], audio], axis=1), ring[rows, own, nxt])
  )
  t_slot = offset % text_win.shape[1]
  text_win = text_win.at[rows[:, 0], t_slot].set(keep(text, text_win[rows[:, 0], t_slot]))
  a_slot = offset % audio_win.shape[2]
  pen = audio[:, : audio_win.shape[1]]  # [B,P]
  audio_win = audio_win.at[rows[:, 0], :, a_slot].set(keep(pen, audio_win[rows[:, 0], :, a_slot]))
  offset = offset + active.astype(jnp.int32)

  # 6. The un-delayed output.
  out_cols = (offset[:, None] - max_delay + delays[None, : 1 + C]) % R  # [B,1+C]
  out = ring[rows, own, out_cols]
  valid = active & (offset > max_delay)
  new_state = {
    **state,
    'cache': cache,
    'ring': ring,
    'offset': offset,
    'text_window': text_win,
    'audio_window': audio_win,
    'keys': keep(jax.random.key_data(next_keys), state['keys']),
  }
  return new_state, out, valid

"""StreamingDecoder: continuous-batching full-duplex decoding, one jitted function per frame."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flmjax import sharding as shd
from flmjax.decode import pages
from flmjax.decode import state as st
from flmjax.decode.frame import frame
from flmjax.decode.pages import PagedKV
from flmjax.decode.sampling import SamplingConfig
from flmjax.errors import FlmjaxError
from flmjax.model import backbone, depth, transforms
from flmjax.model.flm import FLMAudio
from flmjax.model.params import split_leading

OVERFLOW_POLICIES = ('error', 'slide')
# The depth layers' logical axes that the rules split; replicated under the Pallas kernels.
DEPTH_LAYER_AXES = ('depth_embed', 'depth_heads', 'depth_mlp')


# Weights held as separate buffers per layer (and per codebook) when split_weights (see
# flmjax.model.params.split_leading): path -> how many leading axes are split.
SPLIT_AXES = {
  **{f'backbone/{n}': 1 for n in backbone.LAYER_PARAMS},
  **{f'depth_transformer/{n}': 1 for n in ('ln_1', 'proj', 'ln_2', 'heads')},
  **{f'depth_transformer/{n}': 2 for n in ('qkv', 'gate', 'up', 'down')},  # qkv: layer, q|k|v
}


def _has_siblings(model) -> bool:
  """Whether any weight carries LoRA adapters or int8 scales (split_leading splits only plain
  weights; a LoRA model is merged before, so this is int8 weights' scales)."""
  names = {str(k) for path, _ in nnx.to_flat_state(nnx.state(model)) for k in path}
  return any(n.endswith(('_scale', '_lora_a', '_lora_b')) for n in names)


class SessionOverflowError(FlmjaxError, RuntimeError):
  """A session reached the end of the decoder's KV cache under overflow='error'."""


class PoolFullError(SessionOverflowError):
  """A session needs a page of the paged KV cache and the pool has none free: under
  overflow='error' for any such session, under 'slide' for a session that holds no page yet."""


class StreamingDecoder:
  """Streams B independent sessions through an FLMAudio, as the official LMGen does for one.

  The state (see flmjax.decode.state) is a plain pytree; every method returns a new one. `step`
  donates its input state, so keep only the returned one.

  max_len: KV-cache positions per session (default cfg.max_position_embeddings). A session can run
    max_len frames. Past that, overflow='error' raises SessionOverflowError from the host before
    the step; overflow='slide' keeps attending to the last max_len frames (the cache is a ring,
    RoPE positions keep counting), which is a sliding-window approximation of the official model.
  A LoRA model (flmjax.model.lora) is merged into its base first (load_weights, which also
  swaps in another model's weights later).
  mesh: sessions shard over the mesh's batch axes (data, fsdp), heads and the KV cache over
    tensor, by flmjax.sharding.RULES. Load the model with load_official(..., mesh=mesh). The
    frame is traced with the mesh in context (flmjax.sharding.traced_on): the model's activation
    constraints apply, the text token is sampled from vocab-sharded logits, and the Pallas depth
    kernels run in shard_map over the session rows, with the depth weights replicated.
  penalty_buffer: ring entries held for each repetition-penalty window (default: the sampling's
    windows). Sessions may then use any window up to it (reset_slots' sampling); one of at
    least max_len (a server's choice) fits every window, since a session never holds more than
    max_len tokens under overflow='error'. Frames whose windows all fit the decoder's sampling
    read only that many entries (flmjax.decode.frame.with_penalty), so a large buffer costs
    only while a session uses a large window.
  kv='paged': the KV cache is one pool of `pages` pages of `page_size` positions per layer
    (flmjax.decode.pages); a session takes a page as it grows and returns its pages when its slot
    is reset or released, and attention reads only the pages in use. max_len (a multiple of
    page_size) bounds one session. A session that needs a page when none is free slides over
    the pages it holds under overflow='slide'; under 'error' the step raises PoolFullError
    before it runs, so no running session is touched. kv_dtype='int8' stores the pool in int8
    with a scale per token and KV head. paged_impl: flmjax.model.paged.IMPLS ('auto': the TPU
    kernel on TPU, the GPU kernel on GPU, XLA elsewhere; 'interpret' / 'gpu_interpret': the TPU
    / GPU kernel in interpret mode).
  depth_layer_fn: a drop-in for flmjax.model.depth.layer_step. depth_layers_fn: a drop-in for
    the whole depth layer stack (depth.layers_step's signature); use_pallas=True takes it from
    flmjax.kernels.depth_step.select_depth_layers_fn (pallas_interpret=True: interpret mode).
  split_weights: hold the layer weights (and the depth's per-codebook ones) as separate buffers
    and unroll the frame's loops over them (flmjax.model.params.split_leading): XLA:CPU's dots
    then read them in place rather than a copy of each slice. Default: on CPU without a mesh
    or custom depth functions, with the contiguous cache. The state's KV cache is then per layer
    too ({'k','v'}: tuples of L [B,K,S,H]; flmjax.decode.state.init). The tokens are the same
    either way (tests/test_decode_split.py).
  """

  def __init__(
    self,
    model: FLMAudio,
    sampling: SamplingConfig | None = None,
    *,
    max_len: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    overflow: str = 'error',
    penalty_buffer: int | None = None,
    depth_layer_fn=None,
    depth_layers_fn=None,
    use_pallas: bool = False,
    pallas_interpret: bool = False,
    rules=shd.RULES,
    kv: str = 'contiguous',
    pages: int | None = None,
    page_size: int = 128,
    kv_dtype: str = 'bf16',
    paged_impl: str = 'auto',
    split_weights=None,  # bool | None
  ):
    if overflow not in OVERFLOW_POLICIES:
      raise ValueError(f'overflow={overflow!r}: use one of {OVERFLOW_POLICIES}')
    self.overflow, self.mesh = overflow, mesh
    # The Pallas depth step cannot be partitioned: it runs on whole rows with every depth weight
    # at hand, so those are stored replicated rather than gathered on every frame.
    if use_pallas and mesh is not None:
      rules = shd.replicating(rules, DEPTH_LAYER_AXES)
    self.rules = rules
    self.graphdef = self.param_shardings = None
    if split_weights is None:  # XLA:CPU copies stacked weights' slices (split_leading)
      custom = use_pallas or depth_layer_fn is not None or depth_layers_fn is not None
      # Not under the paged cache: there the unrolled program's rounding differs from the
      # contiguous decoder's, which its tests hold bit for bit.
      plain = mesh is None and not custom and kv == 'contiguous'
      split_weights = plain and jax.default_backend() == 'cpu'
    self.split_weights = split_weights and not _has_siblings(model)
    self.load_weights(model)  # sets cfg (the merged model's, for a LoRA model)
    cfg = self.cfg
    self.sampling = sampling or SamplingConfig()
    self.max_len = int(max_len or cfg.max_position_embeddings)
    if self.max_len < 1:
      raise ValueError(f'max_len={self.max_len}: a session needs at least one cache position')
    self.kv = self._paged(kv, pages, page_size, kv_dtype, paged_impl)
    self.penalty_buffers = {
      k: max(self.sampling.penalty_buffer(k), int(penalty_buffer or 0)) for k in ('text', 'audio')
    }
    if use_pallas:
      # The whole-stack entry: the kernels read each layer's weights from the stacked arrays in
      # place, where a per-layer layer_fn under the scan would get sliced (copied) weights.
      from flmjax.kernels.depth_step import select_depth_layers_fn

      depth_layers_fn = select_depth_layers_fn(interpret=pallas_interpret)
    self.depth_layer_fn = depth_layer_fn or depth.layer_step
    self.depth_layers_fn = depth_layers_fn
    self._seeds = itertools.count(1 << 20)  # default seeds for reset_slots, past init's
    self._jits: dict[int, dict] = {}

  def load_weights(self, model: FLMAudio) -> None:
    """The weights every frame runs from now on, the one way in: a LoRA model is merged into
    its base first (plain weights), and the result is placed on the decoder's mesh. A later
    model must have the first one's parameter tree and shapes (dtypes may differ), so the
    compiled functions stay valid."""
    if getattr(model, 'lora', None) is not None:  # a LoRA model decodes merged (plain weights)
      model = transforms.merge(model)
    graphdef, params = nnx.split(model)
    shapes = jax.tree.structure(params), jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(params))
    if self.graphdef is None:  # the first model fixes the config and the placement
      self.cfg, self._shapes = model.cfg, shapes
      if self.mesh is not None:
        shd.validate_mesh(self.cfg, self.mesh.shape)
        self.param_shardings = shd.state_shardings(params, self.mesh, self.rules)
    elif shapes != self._shapes:
      raise ValueError(
        "load_weights: the model's parameters differ from the ones this decoder was built "
        'for (another config?); build a new StreamingDecoder for it'
      )
    self.graphdef = graphdef
    if self.split_weights:
      params = split_leading(params, SPLIT_AXES)
    self.params = params if self.mesh is None else jax.device_put(params, self.param_shardings)

  # ---- compiled functions, one set per batch size ------------------------------------------
  def state_shardings(self, batch: int):
    """The NamedShardings of a state with `batch` rows on the decoder's mesh."""
    shape = jax.eval_shape(
      lambda: st.init(
        self.cfg,
        self.sampling,
        batch,
        self.max_len,
        jnp.zeros((batch,), jnp.uint32),
        self.penalty_buffers,
        self.kv,
        self.split_weights,
      )
    )
    return st.shardings(shape, self.mesh, self.rules)

  def _paged(self, kv, pages, page_size, kv_dtype, impl):
    if kv == 'contiguous':
      if kv_dtype != 'bf16':
        raise ValueError(f"kv_dtype={kv_dtype!r} needs kv='paged' (int8 is paged-only)")
      return None
    if kv != 'paged':
      raise ValueError(f"kv={kv!r}: use 'contiguous' or 'paged'")
    if pages is None:
      raise ValueError("kv='paged' needs pages=N, the pool's size in pages")
    if self.max_len % page_size:
      raise ValueError(
        f'max_len={self.max_len} is not a multiple of page_size={page_size}; use a multiple'
      )
    return PagedKV(pages, page_size, self.max_len // page_size, kv_dtype, impl)

  def _compiled(self, batch: int, span: int = 1) -> dict:
    if (batch, span) in self._jits:
      return self._jits[(batch, span)]
    cfg, sampling, max_len = self.cfg, self.sampling, self.max_len

    def run_frame(params, state, user):
      model = nnx.merge(self.graphdef, params)
      return frame(
        model,
        state,
        user,
        penalized=sampling.penalized_codebooks,
        layer_fn=self.depth_layer_fn,
        layers_fn=self.depth_layers_fn,
        fast_windows=self.fast_windows,
        kv=self.kv,
        span=span,
      )

    run_frame = shd.traced_on(self.mesh, run_frame)
    make = lambda seeds: st.init(
      cfg, sampling, batch, max_len, seeds, self.penalty_buffers, self.kv, self.split_weights
    )
    reset = functools.partial(st.reset, cfg)
    if self.mesh is None:
      fns = dict(
        frame=jax.jit(run_frame, donate_argnums=1),
        init=jax.jit(make),
        reset=jax.jit(reset, donate_argnums=0),
        release=jax.jit(st.release, donate_argnums=0),
      )
    else:
      s = self.state_shardings(batch)
      rows = lambda ndim: shd.named_sharding(
        ('batch',) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1), self.mesh, self.rules
      )
      params = self.param_shardings
      fns = dict(
        frame=jax.jit(
          run_frame,
          in_shardings=(params, s, rows(2)),
          out_shardings=(s, rows(2), rows(1)),
          donate_argnums=1,
        ),
        init=jax.jit(make, in_shardings=(rows(1),), out_shardings=s),
        reset=jax.jit(
          reset,
          in_shardings=(s, rows(1), rows(1), s['text'], s['audio']),
          out_shardings=s,
          donate_argnums=0,
        ),
        release=jax.jit(st.release, in_shardings=(s, rows(1)), out_shardings=s, donate_argnums=0),
      )
    self._jits[(batch, span)] = fns
    return fns

  # ---- public API --------------------------------------------------------------------------
  def init(self, batch_size: int, seed: int = 0) -> dict:
    """B fresh, active sessions; session b samples with the key of seed + b."""
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size}: need at least one session slot')
    seeds = np.arange(batch_size, dtype=np.uint32) + np.uint32(seed)
    return self._compiled(batch_size)['init'](seeds)

  def step(self, state: dict, user_codes) -> tuple[dict, jax.Array, jax.Array]:
    """One 80 ms frame: user_codes [B,C] (the user's codes of this frame, 0..PAD) ->
    (state, out [B,1+C] = [text, C speak codes] un-delayed, valid [B])."""
    batch = state['offset'].shape[0]
    user = self._check_user(user_codes, batch)
    if self.overflow == 'error':
      offsets, active = np.asarray(state['offset']), np.asarray(state['active'])
      full = np.flatnonzero(active & (offsets >= self.max_len))
      if full.size:
        raise SessionOverflowError(
          f'session slot(s) {full.tolist()} reached max_len={self.max_len} frames: the KV cache '
          f'is full. Release or reset them, build the decoder with a larger max_len, or use '
          f"overflow='slide' to attend to the last max_len frames only"
        )
    span = 1
    if self.kv is not None:
      span = self.check_pages(state)
    return self._compiled(batch, span)['frame'](self.params, state, user)

  def check_pages(self, state: dict) -> int:
    """Host check of a paged state before a frame: raises PoolFullError for a session that
    needs a page the pool cannot give (under overflow='error', or holding none); returns the
    frame's span (flmjax.decode.pages.span)."""
    short = pages.shortfall(state, self.kv)
    held = np.asarray(state['held'])
    stuck = short if self.overflow == 'error' else short[held[short] == 0]
    if stuck.size:
      raise PoolFullError(
        f'session slot(s) {stuck.tolist()} need a KV page and the pool of {self.kv.pages} '
        'pages has none free. Release sessions, build the decoder with more pages, or use '
        "overflow='slide' to let running sessions slide over the pages they hold"
      )
    offset, active = np.asarray(state['offset']), np.asarray(state['active'])
    return pages.span(offset, active, self.kv)

  def reset_slots(
    self, state: dict, mask, *, seeds=None, sampling: SamplingConfig | None = None
  ) -> dict:
    """Starts fresh sessions in the slots where mask [B] is True (continuous batching).

    seeds: an int or [B] ints for the new sessions' PRNG keys (default: fresh ones). sampling:
    the new sessions' parameters (default: the decoder's); other slots keep theirs.
    """
    batch = state['offset'].shape[0]
    mask = self._check_mask(mask, batch)
    sampling = sampling or self.sampling
    self.check_windows(sampling, 'reset_slots: sampling.')
    if sampling.penalized_codebooks != self.sampling.penalized_codebooks:
      raise ValueError(
        f'reset_slots: sampling.penalized_codebooks='
        f"{sampling.penalized_codebooks} must equal the decoder's "
        f'{self.sampling.penalized_codebooks} (it fixes the compiled frame)'
      )
    if seeds is None:
      seeds = np.array([next(self._seeds) for _ in range(batch)], np.uint32)
    seeds = np.broadcast_to(np.asarray(seeds, np.uint32), (batch,))
    text, audio = (sampling.stream(k).per_row(batch) for k in ('text', 'audio'))
    return self._compiled(batch)['reset'](state, mask, seeds, text, audio)

  @property
  def fast_windows(self) -> tuple[int, int]:
    """The (text, audio) windows a frame reads alone while every session fits them."""
    return tuple(self.sampling.penalty_buffer(k) for k in ('text', 'audio'))

  def max_window(self, kind: str) -> int | None:
    """The largest 'text' or 'audio' penalty window a session may use; None: any (the buffer
    holds a whole session, and a session never outgrows max_len under overflow='error')."""
    buffer = self.penalty_buffers[kind]
    return None if self.overflow == 'error' and buffer >= self.max_len else buffer

  def check_windows(self, sampling: SamplingConfig, where: str = '') -> None:
    """ValueError unless `sampling`'s penalty windows fit this decoder's buffers."""
    for kind in ('text', 'audio'):
      have, most = getattr(sampling, f'penalty_window_{kind}'), self.max_window(kind)
      if most is not None and have > most:
        raise ValueError(
          f'{where}penalty_window_{kind}={have} exceeds the penalty buffer of {most}; build '
          'the decoder with penalty_buffer (a server: `max_len`) at least that large'
        )

  def release_slots(self, state: dict, mask) -> dict:
    """Frees the slots where mask [B]: they stop advancing and return valid=False."""
    batch = state['offset'].shape[0]
    return self._compiled(batch)['release'](state, self._check_mask(mask, batch))

  def input_column(self, state: dict) -> jax.Array:
    """[B,Z]: the delayed-grid column each slot's backbone read in its latest step."""
    ring = state['ring']
    col = (state['offset'] - 1) % ring.shape[2]
    return ring[jnp.arange(ring.shape[0]), :, col]

  # ---- input checks ------------------------------------------------------------------------
  def _check_user(self, user_codes, batch: int) -> np.ndarray:
    cfg = self.cfg
    user = np.asarray(user_codes)
    want = (batch, cfg.num_codebooks)
    if user.shape != want:
      raise ValueError(
        f'user_codes: expected shape {want} ([batch, codebooks]) for this state, got {user.shape}'
      )
    if not np.issubdtype(user.dtype, np.integer):
      raise ValueError(f'user_codes: expected integer codes, got dtype {user.dtype}')
    bad = (user < 0) | (user > cfg.audio_pad_id)
    if bad.any():
      b, c = np.argwhere(bad)[0]
      raise ValueError(
        f'user_codes: code {int(user[b, c])} at [slot {b}, codebook {c}] is out of '
        f'range: expected 0..{cfg.audio_pad_id - 1}, or {cfg.audio_pad_id} (PAD)'
      )
    return user.astype(np.int32)

  @staticmethod
  def _check_mask(mask, batch: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (batch,) or mask.dtype != bool:
      raise ValueError(
        f'slot mask: expected a bool array of shape ({batch},), got {mask.dtype} {mask.shape}'
      )
    return mask

"""The batched frame computation of the server: Mimi encode -> LM step -> Mimi decode for B slots.

`FramePipeline.step` is synchronous and deterministic: one jitted call runs the whole frame for
every slot (one dispatch, one host sync). The server's frame loop calls it once per 80 ms tick;
flmjax.serve.reference replays the same call offline (the cross-talk reference). Shape letters:
B session slots, S samples per frame (1920), C codebooks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd
from flmjax.codec import mimi as mimi_lib
from flmjax.codec.base import playable
from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.decode.frame import frame as lm_frame


def frame_step(
  mimi_cfg,
  graphdef,
  layer_fn,
  layers_fn,
  penalized: int,
  fast_windows: tuple[int, int],
  kv,
  span: int,
  mimi_params,
  lm_params,
  encoder,
  lm,
  decoder,
  pcm,
):
  """Pure: pcm [B,S] -> (encoder, lm, decoder, out [B,1+C], valid [B], reply [B,S]).

  encoder / decoder: the user's and the model's Mimi stream states; lm: the StreamingDecoder
  state. A slot's audio decoder starts with its first valid output (before it the official
  LMGen.step returns None and nothing is decoded), so it is kept fresh until then.
  """
  encoder, codes = mimi_lib.encode_step(mimi_cfg, mimi_params, encoder, pcm)  # [B,C]
  lm, out, valid = lm_frame(
    nnx.merge(graphdef, lm_params),
    lm,
    codes,
    penalized=penalized,
    layer_fn=layer_fn,
    layers_fn=layers_fn,
    fast_windows=fast_windows,
    kv=kv,
    span=span,
  )
  speak = playable(out[:, 1:], mimi_cfg.quantizer_bins)  # a tiny random LM can emit PAD as speech
  new, reply = mimi_lib.decode_step(mimi_cfg, mimi_params, decoder, speak)
  fresh = mimi_lib.init_stream(mimi_cfg, pcm.shape[0])['decoder']
  keep = ~valid
  decoder = jax.tree.map(
    lambda f, n: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), f, n), fresh, new
  )
  return encoder, lm, decoder, out, valid, reply


def serving_mesh(text: str | None, slots: int):
  """The `mesh` of a server (None: one device); its batch axes must divide the slots."""
  if not text:
    return None
  sizes = shd.parse_axes(text)
  mesh = shd.make_mesh(**sizes)
  rows = sizes.get('data', 1) * sizes.get('fsdp', 1)
  if slots % rows:
    raise ValueError(
      f'`slots` {slots}: the sessions shard over data x fsdp = {rows} devices of '
      f'`mesh` {text}; use a multiple of {rows}'
    )
  return mesh


@dataclasses.dataclass
class FrameOut:
  """One tick's results, host arrays: text [B] int32, pcm [B,S] float32, valid [B] bool (a slot's
  first max_delay steps return nothing, as the official LMGen.step returns None)."""

  text: np.ndarray
  pcm: np.ndarray
  valid: np.ndarray


class FramePipeline:
  """Owns the LM decoder state and two streaming Mimi states (the user's encoder side, the
  model's decoder side), all with B rows. Joining and leaving only mask rows: no recompilation.

  mimi: a flmjax.codec.Mimi (its streaming functions are fused into the frame). Each stream
  state is a whole Mimi stream state, of which the frame uses one half.
  mesh: sessions (rows) shard over its batch axes (data, fsdp), the LM's heads and KV cache
  over tensor (StreamingDecoder's placement); Mimi is replicated. The frame is traced with the
  mesh in context. use_pallas: the Pallas depth kernels (StreamingDecoder's switch).
  """

  def __init__(
    self,
    model,
    mimi,
    slots: int,
    *,
    sampling: SamplingConfig | None = None,
    max_len: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    use_pallas: bool = False,
    overflow: str = 'error',
    kv_pages: int | None = None,
    page_size: int = 128,
    kv_dtype: str = 'bf16',
  ):
    self.cfg = model.cfg
    self.mimi, self.slots, self.mesh = mimi, slots, mesh
    self.frame_size = int(mimi.frame_size)
    # The penalty rings hold a whole session: a client may ask for any window (the official
    # gradio client's slider goes to 100), and frames cost more only while one does.
    session = int(max_len or model.cfg.max_position_embeddings)
    paged = {} if kv_pages is None else dict(kv='paged', pages=kv_pages, page_size=page_size)
    self.decoder = dec = StreamingDecoder(
      model,
      sampling,
      max_len=session,
      mesh=mesh,
      use_pallas=use_pallas,
      penalty_buffer=session,
      overflow=overflow,
      kv_dtype=kv_dtype,
      **paged,
    )
    self.max_len = dec.max_len
    self.lm = dec.release_slots(dec.init(slots), np.ones((slots,), bool))
    self._free_pages = None if dec.kv is None else dec.kv.pages
    self.mimi_params = mimi.params
    self.user_stream = mimi.init_stream(slots)  # encoder side: the user's audio -> codes
    self.model_stream = mimi.init_stream(slots)  # decoder side: the model's codes -> audio
    self.active = np.zeros((slots,), bool)
    self.frames = np.zeros((slots,), np.int64)  # steps taken by each slot's current session
    self._frames: dict[int, object] = {}  # one jitted frame per paged span
    self._step = lambda span: shd.traced_on(
      mesh,
      functools.partial(
        frame_step,
        mimi.cfg,
        dec.graphdef,
        dec.depth_layer_fn,
        dec.depth_layers_fn,
        dec.sampling.penalized_codebooks,
        dec.fast_windows,
        dec.kv,
        span,
      ),
    )
    if mesh is None:
      self._jit = lambda step: jax.jit(step, donate_argnums=(2, 3, 4))
      self._frame = self._frames[1] = self._jit(self._step(1))
      return
    # Sessions over the batch axes (Mimi's stream states are [B,...] throughout), Mimi's
    # weights replicated, the LM as the decoder places it (heads and KV cache over tensor).
    self._lm_shardings = lm = dec.state_shardings(slots)
    self.mimi_params = jax.device_put(mimi.params, NamedSharding(mesh, P()))
    self.user_stream = self._rows(self.user_stream)
    self.model_stream = self._rows(self.model_stream)
    enc, mdl = (
      self._row_shardings(x) for x in (self.user_stream['encoder'], self.model_stream['decoder'])
    )
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), self.mimi_params)
    pcm, out = shd.batch_sharding(mesh, 2), shd.batch_sharding(mesh, 1)
    self._jit = lambda step: jax.jit(
      step,
      donate_argnums=(2, 3, 4),
      in_shardings=(replicated, dec.param_shardings, enc, lm, mdl, pcm),
      out_shardings=(enc, lm, mdl, pcm, out, pcm),
    )
    self._frame = self._frames[1] = self._jit(self._step(1))  # the contiguous cache's only one

  def _row_shardings(self, tree):
    return jax.tree.map(lambda x: shd.batch_sharding(self.mesh, x.ndim), tree)

  def _rows(self, tree):
    """tree's [B,...] leaves back on the batch axes (a jit without shardings, such as Mimi's
    reset, may place them otherwise, and the frame's jit takes its shardings strictly)."""
    return tree if self.mesh is None else jax.device_put(tree, self._row_shardings(tree))

  def warmup(self) -> None:
    """Compiles every call the frame loop makes (start, both kinds of step, stop), so the
    first session does not stall the others."""
    every = np.ones((self.slots,), bool)
    if self.decoder.kv is not None:  # a paged pool may hold fewer first pages than slots
      every = np.arange(self.slots) < self.decoder.kv.pages
    self.start(every)
    for _ in range(self.cfg.max_delay + 1):
      self.step(np.zeros((self.slots, self.frame_size), np.float32))
    self.stop(every)
    kv = self.decoder.kv
    if kv is not None:  # the paged frame of every span a session may grow into, compiled now
      args = (
        self.mimi_params,
        self.decoder.params,
        self.user_stream['encoder'],
        self.lm,
        self.model_stream['decoder'],
        np.zeros((self.slots, self.frame_size), np.float32),
      )
      span = 2
      while span <= kv.max_pages:
        if span not in self._frames:
          self._frames[span] = self._jit(self._step(span)).lower(*args).compile()
        span *= 2

  def start(self, mask, sampling: SamplingConfig | None = None, seeds=None) -> None:
    """Fresh sessions in the slots where mask [B]; `sampling` applies to those slots only."""
    mask = np.asarray(mask, bool)
    if not mask.any():
      return
    self.lm = self.decoder.reset_slots(self.lm, mask, sampling=sampling, seeds=seeds)
    self.user_stream = self._rows(self.mimi.reset_slots(self.user_stream, mask))
    self.model_stream = self._rows(self.mimi.reset_slots(self.model_stream, mask))
    self.active |= mask
    self.frames[mask] = 0

  def stop(self, mask) -> None:
    """Frees the slots where mask [B]: they stop advancing at once."""
    mask = np.asarray(mask, bool) & self.active
    if mask.any():
      self.lm = self.decoder.release_slots(self.lm, mask)
      self.active &= ~mask
      self._count_free()

  def set_sampling(self, mask, sampling: SamplingConfig) -> None:
    """New sampling parameters for the live sessions where mask [B], without a restart."""
    mask = np.asarray(mask, bool)
    self.check_sampling(sampling)
    for kind in ('text', 'audio'):
      new = sampling.stream(kind).per_row(self.slots)
      self.lm[kind] = jax.tree.map(
        lambda n, o: jnp.where(jnp.asarray(mask), n, o), new, self.lm[kind]
      )
      if self.mesh is not None:  # back where the frame's jit takes it
        self.lm[kind] = jax.device_put(self.lm[kind], self._lm_shardings[kind])

  def check_sampling(self, sampling: SamplingConfig) -> None:
    """ValueError unless `sampling` fits the compiled frame (StreamingDecoder.reset_slots')."""
    base = self.decoder.sampling
    self.decoder.check_windows(sampling)  # any window, with the rings sized to the session
    if sampling.penalized_codebooks != base.penalized_codebooks:
      raise ValueError(f'penalized_codebooks must stay {base.penalized_codebooks}')

  def free_pages(self) -> int | None:
    """Free pages of the paged KV pool after the latest call (None: a contiguous cache). A host
    copy: the frame loop's thread reads it while the worker's step holds (donates) the state."""
    return self._free_pages

  def _count_free(self) -> None:
    if self.decoder.kv is not None:
      self._free_pages = int(np.asarray(self.lm['free']).sum())

  def starved(self) -> np.ndarray:
    """[B] bool: live slots that need a KV page this frame that the pool cannot give and may
    not slide (overflow='error', or holding no page yet). The frame loop ends them before the
    step, as it ends sessions at max_len; nobody else is touched."""
    out = np.zeros((self.slots,), bool)
    if self.decoder.kv is None:
      return out
    from flmjax.decode.pages import shortfall

    short = shortfall(self.lm, self.decoder.kv)
    held = np.asarray(self.lm['held'])
    out[short if self.decoder.overflow == 'error' else short[held[short] == 0]] = True
    return out & self.active

  def at_limit(self) -> np.ndarray:
    """[B] bool: live slots whose session filled the LM's KV cache (max_len frames) and may not
    slide on (overflow != 'slide'). The frame loop ends them before the step, which would
    refuse them."""
    full = self.active & (self.frames >= self.max_len)
    return full & (self.decoder.overflow != 'slide')

  def step(self, pcm: np.ndarray) -> FrameOut:
    """pcm float32 [B,S] (anything in free slots) -> the tick's FrameOut."""
    pcm = np.asarray(pcm, np.float32)
    if pcm.shape != (self.slots, self.frame_size):
      raise ValueError(f'pcm: expected [{self.slots}, {self.frame_size}], got {pcm.shape}')
    if (limit := self.at_limit()).any():
      raise ValueError(
        f'slot(s) {np.flatnonzero(limit).tolist()} reached max_len='
        f'{self.max_len} frames: stop them first'
      )
    span = 1 if self.decoder.kv is None else self.decoder.check_pages(self.lm)
    if span not in self._frames:
      self._frames[span] = self._jit(self._step(span))
    encoder, self.lm, decoder, out, valid, reply = self._frames[span](
      self.mimi_params,
      self.decoder.params,
      self.user_stream['encoder'],
      self.lm,
      self.model_stream['decoder'],
      pcm,
    )
    self.user_stream = {**self.user_stream, 'encoder': encoder}
    self.model_stream = {**self.model_stream, 'decoder': decoder}
    out, valid = np.asarray(out), np.asarray(valid)  # [B,1+C], [B]
    self.frames[self.active] += 1
    self._count_free()
    return FrameOut(
      text=out[:, 0].astype(np.int32), pcm=np.asarray(reply, np.float32), valid=valid & self.active
    )

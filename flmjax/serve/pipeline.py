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

from flmjax.codec import mimi as mimi_lib
from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.decode.frame import frame as lm_frame


def frame_step(mimi_cfg, graphdef, layer_fn, layers_fn, penalized: int, mimi_params, lm_params,
               encoder, lm, decoder, pcm):
  """Pure: pcm [B,S] -> (encoder, lm, decoder, out [B,1+C], valid [B], reply [B,S]).

  encoder / decoder: the user's and the model's Mimi stream states; lm: the StreamingDecoder
  state. A slot's audio decoder starts with its first valid output (before it the official
  LMGen.step returns None and nothing is decoded), so it is kept fresh until then.
  """
  encoder, codes = mimi_lib.encode_step(mimi_cfg, mimi_params, encoder, pcm)  # [B,C]
  lm, out, valid = lm_frame(nnx.merge(graphdef, lm_params), lm, codes, penalized=penalized,
                            layer_fn=layer_fn, layers_fn=layers_fn)
  # A tiny random LM can emit PAD/EMP ids as speech; Mimi has codes 0..bins-1 only.
  speak = jnp.minimum(out[:, 1:], mimi_cfg.quantizer_bins - 1)
  new, reply = mimi_lib.decode_step(mimi_cfg, mimi_params, decoder, speak)
  fresh = mimi_lib.init_stream(mimi_cfg, pcm.shape[0])['decoder']
  keep = ~valid
  decoder = jax.tree.map(lambda f, n: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), f, n),
                         fresh, new)
  return encoder, lm, decoder, out, valid, reply


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
  """

  def __init__(self, model, mimi, slots: int, *, sampling: SamplingConfig | None = None,
               max_len: int | None = None):
    self.cfg = model.cfg
    self.mimi, self.slots = mimi, slots
    self.frame_size = int(mimi.frame_size)
    self.decoder = StreamingDecoder(model, sampling, max_len=max_len)
    self.max_len = self.decoder.max_len
    self.lm = self.decoder.release_slots(self.decoder.init(slots), np.ones((slots,), bool))
    self.user_stream = mimi.init_stream(slots)   # encoder side: the user's audio -> codes
    self.model_stream = mimi.init_stream(slots)  # decoder side: the model's codes -> audio
    self.active = np.zeros((slots,), bool)
    self.frames = np.zeros((slots,), np.int64)  # steps taken by each slot's current session
    dec = self.decoder
    self._frame = jax.jit(functools.partial(
        frame_step, mimi.cfg, dec.graphdef, dec.depth_layer_fn, dec.depth_layers_fn,
        dec.sampling.penalized_codebooks), donate_argnums=(2, 3, 4))

  def warmup(self) -> None:
    """Compiles every call the frame loop makes (start, both kinds of step, stop), so the
    first session does not stall the others."""
    every = np.ones((self.slots,), bool)
    self.start(every)
    for _ in range(self.cfg.max_delay + 1):
      self.step(np.zeros((self.slots, self.frame_size), np.float32))
    self.stop(every)

  def start(self, mask, sampling: SamplingConfig | None = None, seeds=None) -> None:
    """Fresh sessions in the slots where mask [B]; `sampling` applies to those slots only."""
    mask = np.asarray(mask, bool)
    if not mask.any():
      return
    self.lm = self.decoder.reset_slots(self.lm, mask, sampling=sampling, seeds=seeds)
    self.user_stream = self.mimi.reset_slots(self.user_stream, mask)
    self.model_stream = self.mimi.reset_slots(self.model_stream, mask)
    self.active |= mask
    self.frames[mask] = 0

  def stop(self, mask) -> None:
    """Frees the slots where mask [B]: they stop advancing at once."""
    mask = np.asarray(mask, bool) & self.active
    if mask.any():
      self.lm = self.decoder.release_slots(self.lm, mask)
      self.active &= ~mask

  def set_sampling(self, mask, sampling: SamplingConfig) -> None:
    """New sampling parameters for the live sessions where mask [B], without a restart."""
    mask = np.asarray(mask, bool)
    self.check_sampling(sampling)
    for kind in ('text', 'audio'):
      new = sampling.stream(kind).per_row(self.slots)
      self.lm[kind] = jax.tree.map(lambda n, o: jnp.where(jnp.asarray(mask), n, o), new,
                                   self.lm[kind])

  def check_sampling(self, sampling: SamplingConfig) -> None:
    """ValueError unless `sampling` fits the compiled frame (StreamingDecoder.reset_slots')."""
    base = self.decoder.sampling
    for kind in ('text', 'audio'):
      if getattr(sampling, f'window_{kind}') > getattr(base, f'window_{kind}'):
        raise ValueError(f'window_{kind}={getattr(sampling, f"window_{kind}")} exceeds the '
                         f'server\'s penalty window buffer of {getattr(base, f"window_{kind}")}')
    if sampling.penalized_codebooks != base.penalized_codebooks:
      raise ValueError(f'penalized_codebooks must stay {base.penalized_codebooks}')

  def full(self) -> np.ndarray:
    """[B] bool: live slots whose session filled the LM's KV cache (max_len frames)."""
    return self.active & (self.frames >= self.max_len)

  def step(self, pcm: np.ndarray) -> FrameOut:
    """pcm float32 [B,S] (anything in free slots) -> the tick's FrameOut."""
    pcm = np.asarray(pcm, np.float32)
    if pcm.shape != (self.slots, self.frame_size):
      raise ValueError(f'pcm: expected [{self.slots}, {self.frame_size}], got {pcm.shape}')
    if self.active.any() and self.frames[self.active].max() >= self.max_len:
      raise ValueError(f'slot(s) {np.flatnonzero(self.full()).tolist()} reached max_len='
                       f'{self.max_len} frames: stop them first')
    encoder, self.lm, decoder, out, valid, reply = self._frame(
        self.mimi.params, self.decoder.params, self.user_stream['encoder'], self.lm,
        self.model_stream['decoder'], pcm)
    self.user_stream = {**self.user_stream, 'encoder': encoder}
    self.model_stream = {**self.model_stream, 'decoder': decoder}
    out, valid = np.asarray(out), np.asarray(valid)  # [B,1+C], [B]
    self.frames[self.active] += 1
    return FrameOut(text=out[:, 0].astype(np.int32), pcm=np.asarray(reply, np.float32),
                    valid=valid & self.active)

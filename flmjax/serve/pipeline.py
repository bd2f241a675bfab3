"""The batched frame computation of the server: Mimi encode -> LM step -> Mimi decode for B slots.

`FramePipeline.step` is synchronous and deterministic; the server's frame loop calls it once per
80 ms tick, and `replay` runs the same calls offline (the cross-talk reference). Shape letters:
B session slots, S samples per frame (1920), C codebooks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from flmjax.decode import SamplingConfig, StreamingDecoder


@dataclasses.dataclass
class FrameOut:
  """One tick's results, host arrays: text [B] int32, pcm [B,S] float32, valid [B] bool (a slot's
  first max_delay steps return nothing, as the official LMGen.step returns None)."""
  text: np.ndarray
  pcm: np.ndarray
  valid: np.ndarray


class FramePipeline:
  """Owns the LM decoder state and two streaming codec states (the user's encoder side, the
  model's decoder side), all with B rows. Joining and leaving only mask rows: no recompilation.

  codec: a streaming codec with Mimi's interface (init_stream, encode_step, decode_step,
  reset_slots; flmjax.codec.Mimi).
  """

  def __init__(self, model, codec, slots: int, *, sampling: SamplingConfig | None = None,
               max_len: int | None = None):
    self.cfg = model.cfg
    self.codec, self.slots = codec, slots
    self.frame_size = int(codec.frame_size)
    self.decoder = StreamingDecoder(model, sampling, max_len=max_len)
    self.max_len = self.decoder.max_len
    self.lm = self.decoder.release_slots(self.decoder.init(slots), np.ones((slots,), bool))
    self.user_stream = codec.init_stream(slots)   # encoder side: the user's audio -> codes
    self.model_stream = codec.init_stream(slots)  # decoder side: the model's codes -> audio
    self.active = np.zeros((slots,), bool)
    self.frames = np.zeros((slots,), np.int64)  # steps taken by each slot's current session
    self._last_code = int(getattr(getattr(codec, 'cfg', None), 'quantizer_bins', 2048)) - 1

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
    self.user_stream = self.codec.reset_slots(self.user_stream, mask)
    self.model_stream = self.codec.reset_slots(self.model_stream, mask)
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
    import jax
    import jax.numpy as jnp
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
    self.user_stream, codes = self.codec.encode_step(self.user_stream, pcm)  # [B,C]
    self.lm, out, valid = self.decoder.step(self.lm, np.asarray(codes))
    out, valid = np.asarray(out), np.asarray(valid)  # [B,1+C], [B]
    # A tiny random LM can emit PAD/EMP ids as speech; Mimi has codes 0..bins-1 only.
    speak = np.minimum(out[:, 1:], self._last_code)
    self.model_stream, reply = self.codec.decode_step(self.model_stream, speak)
    waiting = self.active & ~valid
    if waiting.any():  # no output yet: that slot's audio decoder has not started (official)
      self.model_stream = self.codec.reset_slots(self.model_stream, waiting)
    self.frames[self.active] += 1
    return FrameOut(text=out[:, 0].astype(np.int32), pcm=np.asarray(reply, np.float32),
                    valid=valid & self.active)

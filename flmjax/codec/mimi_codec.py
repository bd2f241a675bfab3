"""Mimi behind the numpy `Codec` interface, for `flmjax data prepare` and `flmjax chat`.

`encode_batch` encodes many waves at once: they are sorted by length, right-padded to a
power-of-two number of frames (the model is causal, so padding never changes earlier codes) and
sent in batches whose rows are sharded over all devices (params replicated). Long waves are cut
into windows of `window_frames`, each warmed up on the frames before it that can still reach it
(the receptive field: SEANet's, plus `context` steps per transformer layer), so memory stays
bounded and the codes equal one whole-file call up to float rounding.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flmjax import sharding
from flmjax.codec import mimi as mimi_lib
from flmjax.codec import seanet
from flmjax.codec.base import Codec


class MimiCodec(Codec):
  def __init__(
    self,
    mimi: mimi_lib.Mimi,
    *,
    samples_per_device: int = 1 << 20,
    window_frames: int = 1000,
    devices=None,
  ):
    cfg = self.cfg = mimi.cfg
    self.mimi = mimi
    self.sample_rate, self.frame_size = cfg.sample_rate, cfg.frame_size
    self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.quantizer_bins
    self.window_frames = window_frames
    self.warmup_frames = receptive_field_frames(cfg)
    self.samples_per_device = samples_per_device
    devices = list(devices if devices is not None else jax.devices())
    self.mesh = sharding.make_mesh(data=len(devices), devices=devices)
    self._params = jax.device_put(mimi.params, NamedSharding(self.mesh, P()))
    self._rows = sharding.batch_sharding(self.mesh, 2)
    self._encode = jax.jit(functools.partial(mimi_lib.encode, cfg), out_shardings=self._rows)

  def encode(self, wave: np.ndarray) -> np.ndarray:
    """float32 [samples] at 24 kHz -> int32 [K, ceil(samples / 1920)]."""
    return self.encode_batch([wave])[0]

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """int [K, frames] -> float32 [frames * 1920]."""
    return np.asarray(self.mimi.decode(np.asarray(codes)[None]))[0]

  def encode_batch(self, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Mono float32 waves at 24 kHz -> their codes int32 [K, ceil(len / 1920)], in order."""
    F = self.frame_size
    pieces = []  # (wave index, first frame kept, pcm of warmup + window)
    for i, wave in enumerate(waves):
      wave = np.asarray(wave, np.float32)
      problem = f'not mono (shape {wave.shape})' if wave.ndim != 1 else mimi_lib.pcm_problem(wave)
      if problem:
        raise ValueError(f'MimiCodec.encode_batch: wave {i}: {problem}')
      frames = -(-wave.size // F)
      for start in range(0, frames, self.window_frames):
        lo = max(0, start - self.warmup_frames)
        pieces.append((i, start - lo, wave[lo * F : (start + self.window_frames) * F]))
    out: list[list[np.ndarray]] = [[] for _ in waves]
    codes_of = {}
    order = sorted(range(len(pieces)), key=lambda j: pieces[j][2].size)
    n_dev = self.mesh.devices.size
    while order:
      frames = _bucket(-(-pieces[order[-1]][2].size // F))  # the longest piece left sets the pad
      per_device = max(1, self.samples_per_device // (frames * F))
      take, order = order[-per_device * n_dev :], order[: -per_device * n_dev]  # the longest left
      batch = np.zeros((-(-len(take) // n_dev) * n_dev, frames * F), np.float32)
      for row, j in enumerate(take):
        batch[row, : pieces[j][2].size] = pieces[j][2]
      codes = np.asarray(self._encode(self._params, jax.device_put(batch, self._rows)))
      for row, j in enumerate(take):
        codes_of[j] = codes[row]
    for j, (i, skip, pcm) in enumerate(pieces):
      out[i].append(codes_of[j][:, skip : -(-pcm.size // F)])
    return [np.concatenate(parts, axis=1).astype(np.int32) for parts in out]


def load_mimi_codec(path: str, num_codebooks: int = 8) -> MimiCodec:
  """A Mimi checkpoint (flmjax.codec.load_mimi: a safetensors file or a directory holding one)
  as a Codec batched over all devices; what every command's --mimi gives."""
  return MimiCodec(mimi_lib.load_mimi(path, num_codebooks=num_codebooks))


def receptive_field_frames(cfg) -> int:
  """How many frames back a batch-mode code can see: SEANet's receptive field, then
  context - 1 steps per transformer layer, then the stride-2 downsampler's extra step."""
  samples, jump = 1, 1
  for _, _, _, k, stride, dilation in seanet.encoder_convs(cfg):
    samples += (k - 1) * dilation * jump
    jump *= stride
  steps = -(-samples // cfg.hop_length) + cfg.num_layers * (cfg.context - 1) + 1
  return -(-steps // cfg.resample_stride) + 1


def _bucket(frames: int) -> int:
  """Powers of two from 16 frames (1.28 s) up to 256, then multiples of 256: few shapes to
  compile, little padding."""
  return max(16, 1 << (frames - 1).bit_length()) if frames <= 256 else -(-frames // 256) * 256

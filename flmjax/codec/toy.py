"""`ToyCodec`: the embedded synthetic corpus's exact, deterministic stand-in for Mimi.

Each code is written as 11 on/off sine tones on its own FFT bins of the frame, so
encode(decode(codes)) == codes and audio manifests can run end to end without any model.
"""

from __future__ import annotations

import numpy as np

from flmjax.codec.base import Codec


class ToyCodec(Codec):
  """Bit-tone codec: bit b of codebook k is a sine on FFT bin 4 + 2 * (11 k + b) of its frame."""

  bits = 11  # 2048 codes
  amplitude = 0.01  # 88 tones at most: the peak stays below 1

  def __init__(self):
    self._bins = 4 + 2 * np.arange(self.num_codebooks * self.bits)  # [88]
    t = np.arange(self.frame_size) / self.frame_size
    self._tones = np.sin(2 * np.pi * self._bins[:, None] * t[None, :]).astype(np.float32)  # [88, S]

  def decode(self, codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
      raise ValueError(
        f'ToyCodec.decode: codes must be [{self.num_codebooks}, frames], got shape {codes.shape}'
      )
    bits = (codes[:, None, :] >> np.arange(self.bits)[None, :, None]) & 1  # [K, 11, F]
    bits = bits.reshape(-1, codes.shape[1]).astype(np.float32)  # [88, F]
    frames = np.einsum('nf,ns->fs', bits, self._tones) * self.amplitude  # [F, S]
    return frames.reshape(-1).astype(np.float32)

  def encode(self, wave: np.ndarray) -> np.ndarray:
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
      raise ValueError(f'ToyCodec.encode: wave must be mono [samples], got shape {wave.shape}')
    num_frames = wave.shape[0] // self.frame_size  # a trailing partial frame carries no code
    frames = wave[: num_frames * self.frame_size].reshape(num_frames, self.frame_size)  # [F, S]
    spectrum = np.abs(np.fft.rfft(frames, axis=1))[:, self._bins] * (2 / self.frame_size)  # [F, 88]
    bits = (
      (spectrum > self.amplitude / 2)
      .astype(np.int32)
      .T.reshape(self.num_codebooks, self.bits, num_frames)
    )  # [K, 11, F]
    return (bits << np.arange(self.bits)[None, :, None]).sum(axis=1).astype(np.int32)

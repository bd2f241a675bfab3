"""Audio reading: soundfile, resampling to 24 kHz with soxr, stereo split into (model, user)."""
from __future__ import annotations

import os

import numpy as np

from flmjax.codec.base import SAMPLE_RATE


class AudioError(ValueError):
  """An audio file is unreadable or does not match what the manifest says."""


def read_audio(path: str | os.PathLike, *, sample_rate: int, channels: int,
               target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Reads `path`, checks its rate and channel count, resamples to `target_rate`.

  Returns float32 [channels, samples]. For a conversation, channel 0 is the model, 1 the user.
  """
  import soundfile
  import soxr
  try:
    wave, file_rate = soundfile.read(str(path), dtype='float32', always_2d=True)  # [S, C]
  except Exception as e:  # soundfile raises several types for missing/corrupt files
    raise AudioError(f'cannot read audio {str(path)!r}: {e}') from e
  if file_rate != sample_rate:
    raise AudioError(f'audio {str(path)!r} has sample rate {file_rate} Hz; the manifest says '
                     f'{sample_rate} Hz')
  if wave.shape[1] != channels:
    raise AudioError(f'audio {str(path)!r} has {wave.shape[1]} channel(s); expected {channels}')
  if file_rate != target_rate:
    wave = soxr.resample(wave, file_rate, target_rate, quality='HQ')  # [S', C]
  return np.ascontiguousarray(wave.T, dtype=np.float32)

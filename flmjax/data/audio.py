"""Audio reading: soundfile, resampling to 24 kHz with soxr, stereo split into (model, user)."""
from __future__ import annotations

import os

import numpy as np

from flmjax.codec.base import SAMPLE_RATE


class AudioError(ValueError):
  """An audio file is unreadable or does not match what was asked of it; the message names the
  file. `reason` is a short category ('unreadable' or 'bad_audio_format')."""

  def __init__(self, message: str, reason: str = 'bad_audio_format'):
    super().__init__(message)
    self.reason = reason


def read_audio(path: str | os.PathLike, *, sample_rate: int | None = None,
               channels: int | None = None, channel: int | None = None,
               target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Reads `path` and resamples it to `target_rate` (soxr); returns float32 [channels, samples].

  sample_rate: the rate the file must have (a manifest's "sample_rate"); None takes the file's.
  channels: the channel count the file must have (a conversation: 0 the model, 1 the user).
  channel: keep only this channel -> [1, samples]. With neither, the file must be mono: channels
  are never averaged silently.
  """
  import soundfile
  import soxr
  path = str(path)
  if not os.path.isfile(path):
    raise AudioError(f'{path}: no such audio file', 'unreadable')
  try:
    wave, file_rate = soundfile.read(path, dtype='float32', always_2d=True)  # [S, C]
  except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
    raise AudioError(f'{path}: not a readable audio file (WAV, FLAC or OGG): {e}',
                     'unreadable') from None
  if wave.shape[0] == 0:
    raise AudioError(f'{path}: the audio holds no samples')
  if not np.isfinite(wave).all():
    raise AudioError(f'{path}: the audio holds NaN or infinite samples')
  if sample_rate is not None and file_rate != sample_rate:
    raise AudioError(f'{path}: sample rate {file_rate} Hz, but the manifest says {sample_rate} Hz')
  found = wave.shape[1]
  if channels is not None and found != channels:
    raise AudioError(f'{path}: {found} channel(s); expected {channels}')
  if channel is not None:
    if not 0 <= channel < found:
      raise AudioError(f'{path}: channel {channel} does not exist: the file has {found} '
                       f'channel(s) (0..{found - 1})')
    wave = wave[:, channel:channel + 1]
  elif channels is None and found != 1:
    raise AudioError(f'{path}: {found} channels, but one speaker is needed; choose one with '
                     f'--channel N (0..{found - 1})')
  if file_rate != target_rate:
    wave = soxr.resample(wave, file_rate, target_rate, quality='HQ')  # [S', C]
  return np.ascontiguousarray(wave.T, dtype=np.float32)

"""Audio reading: soundfile, resampling to 24 kHz with soxr, stereo split into (model, user)."""

from __future__ import annotations

import os
import struct

import numpy as np

from flmjax.codec.base import SAMPLE_RATE
from flmjax.errors import FlmjaxError


class AudioError(FlmjaxError, ValueError):
  """An audio file is unreadable or does not match what was asked of it; the message names the
  file. `reason` is a short category ('unreadable' or 'bad_audio_format')."""

  def __init__(self, message: str, reason: str = 'bad_audio_format'):
    super().__init__(message)
    self.reason = reason


def read_audio(
  path: str | os.PathLike,
  *,
  sample_rate: int | None = None,
  channels: int | None = None,
  channel: int | None = None,
  target_rate: int = SAMPLE_RATE,
  mono_fix: str | None = None,
) -> np.ndarray:
  """Reads `path` and resamples it to `target_rate` (soxr); returns float32 [channels, samples].

  sample_rate: the rate the file must have (a manifest's "sample_rate"); None takes the file's.
  channels: the channel count the file must have (a conversation: 0 the model, 1 the user).
  channel: keep only this channel -> [1, samples]. With neither, the file must be mono: channels
  are never averaged silently. mono_fix: what the error says to do then (default: choose a
  `channel`).
  """
  import soundfile
  import soxr

  path = str(path)
  if not os.path.isfile(path):
    raise AudioError(f'{path}: no such audio file', 'unreadable')
  check_wav_length(path)
  try:
    wave, file_rate = soundfile.read(path, dtype='float32', always_2d=True)  # [S, C]
  except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
    raise AudioError(
      f'{path}: not a readable audio file (WAV, FLAC or OGG): {e}', 'unreadable'
    ) from None
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
      raise AudioError(
        f'{path}: channel {channel} does not exist: the file has {found} '
        f'channel(s) (0..{found - 1})'
      )
    wave = wave[:, channel : channel + 1]
  elif channels is None and found != 1:
    fix = f', but one speaker is needed; choose one with `channel` N (0..{found - 1})'
    raise AudioError(f'{path}: {found} channels' + (f'; {mono_fix}' if mono_fix else fix))
  if file_rate != target_rate:
    wave = soxr.resample(wave, file_rate, target_rate, quality='HQ')  # [S', C]
  return np.ascontiguousarray(wave.T, dtype=np.float32)


def check_wav_length(path: str) -> None:
  """A WAV whose data chunk is shorter than its header says (a copy or download cut off) would
  read as shorter audio without a word (libsndfile reads what is there): name the file.
  Other formats, and the 'unknown length' sizes streaming writers leave (0, 0xFFFFFFFF), pass."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'WAVE':
      return
    at = 12
    while at + 8 <= size:
      f.seek(at)
      kind, length = struct.unpack('<4sI', f.read(8))
      if kind == b'data':
        have = size - at - 8
        if 0 < length < 0xFFFFFFFF and length > have:
          raise AudioError(
            f'{path}: truncated WAV: its header says {length} bytes of audio, '
            f'the file holds {have}; copy or export the file again',
            'unreadable',
          )
        return
      at += 8 + length + (length & 1)  # chunks are word-aligned

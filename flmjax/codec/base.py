"""The speech codec interface: 24 kHz mono wave <-> 8 codebooks at 12.5 Hz
(docs/architecture.md §1, §8)."""

from __future__ import annotations

import abc

import numpy as np

# The one definition of the audio clock; everything else imports these.
SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms frame
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 frames a second
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 2048


def playable(codes, bins: int = CODEBOOK_SIZE):
  """Speak codes as Mimi can decode them: a model may emit PAD/EMP ids (>= bins) as speech; they
  become code bins - 1, as `flmjax serve` plays them. A numpy or jax array (jitted too)."""
  return codes.clip(max=bins - 1)


class Codec(abc.ABC):
  sample_rate: int = SAMPLE_RATE
  frame_size: int = FRAME_SIZE
  num_codebooks: int = NUM_CODEBOOKS
  codebook_size: int = CODEBOOK_SIZE

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self.frame_size

  @abc.abstractmethod
  def encode(self, wave: np.ndarray) -> np.ndarray:
    """float32 [samples] at `sample_rate` -> int32 [num_codebooks, frames]."""

  @abc.abstractmethod
  def decode(self, codes: np.ndarray) -> np.ndarray:
    """int [num_codebooks, frames] -> float32 [frames * frame_size]."""

  def encode_batch(self, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Many waves at once (a codec on an accelerator batches them); same results as `encode`."""
    return [self.encode(w) for w in waves]

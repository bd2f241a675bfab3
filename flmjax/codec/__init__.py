"""Speech codecs: the Codec interface and ToyCodec (numpy), and Mimi in JAX."""

from flmjax.codec.base import CODEBOOK_SIZE, FRAME_SIZE, NUM_CODEBOOKS, SAMPLE_RATE, Codec
from flmjax.codec.mimi import Mimi, load_mimi
from flmjax.codec.mimi_checkpoint import MimiCheckpointError
from flmjax.codec.mimi_config import MimiConfig
from flmjax.codec.toy import ToyCodec

__all__ = [
  'CODEBOOK_SIZE',
  'FRAME_SIZE',
  'NUM_CODEBOOKS',
  'SAMPLE_RATE',
  'Codec',
  'Mimi',
  'MimiCheckpointError',
  'MimiConfig',
  'ToyCodec',
  'load_mimi',
]

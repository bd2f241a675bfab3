"""flmjax: FLM-Audio in JAX/Flax."""
from flmjax.config import ConfigError, ModelConfig, stream_delays
from flmjax.model import FLMAudio, Output
from flmjax.checkpoint import (CheckpointError, CorruptCheckpointError, load_official,
                               official_shapes, save_official)

__version__ = '0.1.0'

from flmjax.checkpoint.official import (
  CheckpointError,
  load_official,
  official_shapes,
  save_official,
)
from flmjax.checkpoint.safetensors_io import CorruptCheckpointError

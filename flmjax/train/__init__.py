"""Training: sharded train step, the dual schedule, orbax checkpoints, export."""

from flmjax.train.config import (
  DistributedConfig,
  MeshConfig,
  OptimConfig,
  StageConfig,
  TrainConfig,
  TrainConfigError,
  load_config_file,
)
from flmjax.train.overrides import OverrideError, apply_overrides, load_config

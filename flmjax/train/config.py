"""Frozen configuration of a training run: optimizer, mesh, stages (the dual schedule), run.

A config file is a Python file with `get_config(run_dir: str) -> TrainConfig`
(see experiments/configs/tiny_dual.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from flmjax.config import ModelConfig


class TrainConfigError(ValueError):
  """A training config is inconsistent or cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with gradient clipping; the learning rate comes from each stage's schedule."""
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape. data=-1 takes every device not used by fsdp * tensor."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    if self.data == -1:
      if num_devices % (self.fsdp * self.tensor):
        raise TrainConfigError(f'MeshConfig: {num_devices} devices are not a multiple of '
                               f'fsdp*tensor = {self.fsdp * self.tensor}')
      return num_devices // (self.fsdp * self.tensor), self.fsdp, self.tensor
    return self.data, self.fsdp, self.tensor


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One stage of the schedule: data mixture with layouts, loss weights, steps, lr schedule.

  `sources` are flmjax.data.pipeline.SourceSpec (path, weight, layout, offset_frames,
  speech_stream); `loss_weights` a flmjax.data.grid.LossWeights (None: its defaults).
  `random_data=True` trains on random grids instead (tests and benchmarks only).
  """
  name: str
  steps: int
  sources: tuple[Any, ...] = ()
  loss_weights: Any = None
  peak_lr: float = 1e-3
  warmup_steps: int = 0
  end_lr_ratio: float = 0.1  # cosine decays from peak_lr to peak_lr * end_lr_ratio
  random_data: bool = False

  def __post_init__(self):
    if self.steps <= 0:
      raise TrainConfigError(f'stage {self.name!r}: steps must be > 0, got {self.steps}')
    if not 0 <= self.warmup_steps <= self.steps:
      raise TrainConfigError(f'stage {self.name!r}: warmup_steps {self.warmup_steps} must lie '
                             f'in [0, steps={self.steps}]')
    if not self.sources and not self.random_data:
      raise TrainConfigError(f'stage {self.name!r}: no data sources (set sources=... or '
                             f'random_data=True)')


REMAT_POLICIES = ('none', 'full', 'dots')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelConfig
  stages: tuple[StageConfig, ...]
  run_dir: str
  window: int = 64  # frames per training window (columns of the delayed grid)
  batch_size: int = 8  # global batch, split into `grad_accum` micro-batches
  grad_accum: int = 1
  seed: int = 0
  compute_dtype: str = 'bfloat16'  # params and optimizer stay in float32
  remat: str = 'none'  # 'none' | 'full' (save nothing) | 'dots' (save matmul outputs)
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  log_every: int = 10
  init_from: str | None = None  # an official checkpoint directory to fine-tune from
  eval_sources: tuple[Any, ...] = ()  # held-out sources for the end-of-run evaluation
  eval_batches: int = 4
  progress_bar: bool = True

  def __post_init__(self):
    if not self.stages:
      raise TrainConfigError('TrainConfig: stages is empty')
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise TrainConfigError(f'TrainConfig: stage names must be unique, got {names}')
    if self.batch_size % self.grad_accum:
      raise TrainConfigError(f'TrainConfig: batch_size {self.batch_size} is not a multiple of '
                             f'grad_accum {self.grad_accum}')
    if self.remat not in REMAT_POLICIES:
      raise TrainConfigError(f'TrainConfig: remat {self.remat!r} is not one of {REMAT_POLICIES}')
    if self.window < 2:
      raise TrainConfigError(f'TrainConfig: window must be >= 2 columns, got {self.window}')
    if self.window - 1 > self.model.max_position_embeddings:
      raise TrainConfigError(f'TrainConfig: window {self.window} exceeds the model\'s '
                             f'max_position_embeddings {self.model.max_position_embeddings}')
    if self.checkpoint_every <= 0 or self.keep_checkpoints <= 0:
      raise TrainConfigError('TrainConfig: checkpoint_every and keep_checkpoints must be > 0')

  @property
  def total_steps(self) -> int:
    return sum(s.steps for s in self.stages)

  def replace(self, **kw) -> 'TrainConfig':
    return dataclasses.replace(self, **kw)


def to_json(obj: Any) -> Any:
  """A JSON-able description of a (nested) config, for the checkpoint and the logs."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {'__type__': type(obj).__name__,
            **{f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
  if isinstance(obj, (list, tuple)):
    return [to_json(x) for x in obj]
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  return obj


def model_config_from_json(d: dict) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
  return ModelConfig(**kw)


def load_config_file(path: str, run_dir: str | None = None) -> TrainConfig:
  """Imports a config file and calls its `get_config(run_dir)`."""
  if not os.path.isfile(path):
    raise TrainConfigError(f'config file {path} not found')
  spec = importlib.util.spec_from_file_location(
      f'_flmjax_cfg_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise TrainConfigError(f'{path}: defines no get_config(run_dir) function')
  default_dir = os.path.join('runs', os.path.splitext(os.path.basename(path))[0])
  cfg = module.get_config(run_dir or default_dir)
  if not isinstance(cfg, TrainConfig):
    raise TrainConfigError(f'{path}: get_config returned {type(cfg).__name__}, not TrainConfig')
  return cfg

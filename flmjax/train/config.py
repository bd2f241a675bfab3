"""Frozen configuration of a training run: optimizer, mesh, stages (the dual schedule), run.

A config file is a Python file with `get_config(run_dir: str) -> TrainConfig`
(see experiments/configs/tiny_dual.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import traceback
from typing import Any

from flmjax.config import ModelConfig
from flmjax.data.corpus import SyntheticCorpus
from flmjax.data.grid import LossWeights
from flmjax.data.pipeline import SourceSpec  # grain itself loads only when training reads data
from flmjax.errors import FlmjaxError
from flmjax.model.lora import LoraConfig


class TrainConfigError(FlmjaxError, ValueError):
  """A training config is inconsistent or cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with gradient clipping; the learning rate comes from each stage's schedule."""

  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0

  def __post_init__(self):
    for name, ok, why in (
      ('b1', 0 <= self.b1 < 1, 'in [0, 1)'),
      ('b2', 0 <= self.b2 < 1, 'in [0, 1)'),
      ('eps', self.eps > 0, '> 0'),
      ('weight_decay', self.weight_decay >= 0, '>= 0'),
      ('clip_norm', self.clip_norm > 0, '> 0'),
    ):
      if not ok:  # NaN fails every comparison, so it lands here too
        raise TrainConfigError(f'OptimConfig.{name} is {getattr(self, name)!r}; it must be {why}')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape per slice; data=-1 takes every device not used by the other axes.

  dcn_data / dcn_fsdp: slices (processes on CPU/GPU) that multiply the data / fsdp axis across
  the data-center network (multi-slice); the mesh axes stay (data, fsdp, tensor).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1

  def __post_init__(self):
    for name in ('data', 'fsdp', 'tensor', 'dcn_data', 'dcn_fsdp'):
      value = getattr(self, name)
      if not (isinstance(value, int) and (value >= 1 or (name == 'data' and value == -1))):
        raise TrainConfigError(
          f'MeshConfig.{name} is {value!r}; it must be an integer >= 1'
          + (' (or -1: every device left)' if name == 'data' else '')
        )

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) per slice."""
    if self.data == -1:
      rest, what = self.fsdp * self.tensor, 'fsdp*tensor'
      if self.dcn_data * self.dcn_fsdp != 1:
        rest, what = rest * self.dcn_data * self.dcn_fsdp, 'fsdp*tensor*dcn_data*dcn_fsdp'
      if num_devices % rest:
        raise TrainConfigError(
          f'MeshConfig: {num_devices} devices are not a multiple of {what} = {rest}'
        )
      return num_devices // rest, self.fsdp, self.tensor
    return self.data, self.fsdp, self.tensor


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process job (see flmjax.distributed.initialize_distributed).

  Unset fields default to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID;
  `multihost=True` calls jax.distributed.initialize() with no arguments (Cloud TPU VM).
  The job must form within coordinator_timeout_s seconds (all processes joined).
  """

  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  multihost: bool = False
  coordinator_timeout_s: float = 300.0


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One stage of the schedule: data mixture with layouts, loss weights, steps, lr schedule.

  `sources` are flmjax.data.pipeline.SourceSpec (path, weight, layout, offset_frames,
  speech_stream); `loss_weights` a flmjax.data.grid.LossWeights (None: its defaults).
  `random_data=True` trains on random grids instead (tests and benchmarks only).
  `window` / `batch_size` override the run's for this stage (None: TrainConfig's).
  """

  name: str
  steps: int
  sources: tuple[SourceSpec, ...] = ()
  loss_weights: LossWeights | None = None
  peak_lr: float = 1e-3
  warmup_steps: int = 0
  end_lr_ratio: float = 0.1  # cosine decays from peak_lr to peak_lr * end_lr_ratio
  random_data: bool = False
  # This stage's frames per window and windows per step; None: the run's (TrainConfig's). Short
  # single-speaker samples train in a short window instead of padding a long one.
  window: int | None = None
  batch_size: int | None = None

  def __post_init__(self):
    if self.steps <= 0:
      raise TrainConfigError(f'stage {self.name!r}: steps must be > 0, got {self.steps}')
    if not 0 <= self.warmup_steps <= self.steps:
      raise TrainConfigError(
        f'stage {self.name!r}: warmup_steps {self.warmup_steps} must lie in [0, steps={self.steps}]'
      )
    if not (math.isfinite(self.peak_lr) and self.peak_lr > 0):
      raise TrainConfigError(
        f'stage {self.name!r}: peak_lr {self.peak_lr!r} must be a positive number'
      )
    if not 0 <= self.end_lr_ratio <= 1:
      raise TrainConfigError(
        f'stage {self.name!r}: end_lr_ratio {self.end_lr_ratio!r} must lie in [0, 1]'
      )
    if self.loss_weights is not None and not isinstance(self.loss_weights, LossWeights):
      raise TrainConfigError(
        f'stage {self.name!r}: loss_weights is a {type(self.loss_weights).__name__}; give a '
        'flmjax.data.grid.LossWeights(text, wait, semantic, acoustic) or None'
      )
    if not self.sources and not self.random_data:
      raise TrainConfigError(
        f'stage {self.name!r}: no data sources (set sources=... or random_data=True)'
      )


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
  distributed: DistributedConfig = DistributedConfig()
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  log_every: int = 10
  init_from: str | None = None  # an official checkpoint directory to fine-tune from
  eval_sources: tuple[SourceSpec, ...] = ()  # held-out sources for the end-of-run evaluation
  eval_batches: int = 4
  progress_bar: bool = True
  tokenizer: str | None = None  # the data's text tokenizer; export copies it beside the weights
  corpus: SyntheticCorpus | None = None  # the synthetic corpus `train` builds before it starts
  lora: LoraConfig | None = None  # LoRA adapters on a frozen base; None: full fine-tuning

  def __post_init__(self):
    if not self.stages:
      raise TrainConfigError('TrainConfig: stages is empty')
    for name in ('batch_size', 'grad_accum', 'log_every', 'eval_batches'):
      if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
        raise TrainConfigError(
          f'TrainConfig.{name} is {getattr(self, name)!r}; it must be an integer >= 1'
        )
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise TrainConfigError(f'TrainConfig: stage names must be unique, got {names}')
    if self.remat not in REMAT_POLICIES:
      raise TrainConfigError(f'TrainConfig: remat {self.remat!r} is not one of {REMAT_POLICIES}')
    for where, window, batch in [('TrainConfig', self.window, self.batch_size)] + [
      (f'stage {s.name!r}', s.window, s.batch_size) for s in self.stages
    ]:
      self._check_shape(where, window, batch)
    if self.lora is not None and not isinstance(self.lora, LoraConfig):
      raise TrainConfigError(
        f'TrainConfig.lora is a {type(self.lora).__name__}; give a '
        'flmjax.train.config.LoraConfig(rank, alpha, targets) or None'
      )
    if self.checkpoint_every <= 0 or self.keep_checkpoints <= 0:
      raise TrainConfigError('TrainConfig: checkpoint_every and keep_checkpoints must be > 0')
    if self.corpus is not None and not isinstance(self.corpus, SyntheticCorpus):
      raise TrainConfigError(
        f'TrainConfig.corpus is a {type(self.corpus).__name__}; give a '
        'flmjax.data.corpus.SyntheticCorpus(root, ...) or None'
      )

  def _check_shape(self, where: str, window: int | None, batch: int | None) -> None:
    if batch is not None and not (isinstance(batch, int) and batch >= 1):
      raise TrainConfigError(f'{where}: batch_size is {batch!r}; it must be an integer >= 1')
    if batch is not None and batch % self.grad_accum:
      raise TrainConfigError(
        f'{where}: batch_size {batch} is not a multiple of grad_accum {self.grad_accum}'
      )
    if window is not None and not (isinstance(window, int) and window >= 2):
      raise TrainConfigError(f'{where}: window must be >= 2 columns, got {window!r}')
    if window is not None and window - 1 > self.model.max_position_embeddings:
      raise TrainConfigError(
        f"{where}: window {window} exceeds the model's "
        f'max_position_embeddings {self.model.max_position_embeddings}'
      )

  def stage_window(self, stage: int) -> int:
    """Frames per training window in stage `stage` (its own, or the run's)."""
    own = self.stages[stage].window
    return self.window if own is None else own

  def stage_batch_size(self, stage: int) -> int:
    """Global windows per step in stage `stage` (its own, or the run's)."""
    own = self.stages[stage].batch_size
    return self.batch_size if own is None else own

  @property
  def total_steps(self) -> int:
    return sum(s.steps for s in self.stages)

  def replace(self, **kw) -> TrainConfig:
    return dataclasses.replace(self, **kw)


def to_json(obj: Any) -> Any:
  """A JSON-able description of a (nested) config, for the checkpoint and the logs."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {
      '__type__': type(obj).__name__,
      **{f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)},
    }
  if isinstance(obj, (list, tuple)):
    return [to_json(x) for x in obj]
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  return obj


def _unknown_field(e: TypeError) -> str | None:
  """'X.__init__() got an unexpected keyword argument 'y'' -> a message listing X's fields."""
  m = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
  if not m:
    return None
  import flmjax.data.grid
  import flmjax.data.pipeline

  known = {
    c.__name__: c
    for c in (
      TrainConfig,
      StageConfig,
      OptimConfig,
      MeshConfig,
      ModelConfig,
      LoraConfig,
      flmjax.data.pipeline.SourceSpec,
      flmjax.data.grid.LossWeights,
    )
  }
  if m[1] not in known:
    return None
  fields = [f.name for f in dataclasses.fields(known[m[1]])]
  close = difflib.get_close_matches(m[2], fields, n=1)
  return (
    f'{m[1]} has no field {m[2]!r}'
    + (f' (did you mean {close[0]!r}?)' if close else '')
    + f'; its fields: {", ".join(fields)}'
  )


def _where(path: str, e: BaseException) -> str:
  """'path:line' of the deepest traceback frame inside the config file."""
  lines = [
    f.lineno
    for f in traceback.extract_tb(e.__traceback__)
    if os.path.abspath(f.filename) == os.path.abspath(path)
  ]
  return f'{path}:{lines[-1]}' if lines else path


PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def presets() -> list[str]:
  """The named configs that ship inside the package (flmjax/configs/NAME.py)."""
  return sorted(n[:-3] for n in os.listdir(PRESETS_DIR) if n.endswith('.py') and n[0] != '_')


def load_config_file(path: str, run_dir: str | None = None, **kwargs) -> TrainConfig:
  """Imports a config file, or a preset by name (`presets()`), and calls its
  `get_config(run_dir, **kwargs)`. Any error in it becomes a TrainConfigError naming the file
  and line."""
  if os.sep not in path and not path.endswith('.py') and not os.path.exists(path):
    if path not in presets():
      raise TrainConfigError(
        f'config {path!r}: no such file, and no preset of that name; presets: {presets()}'
      )
    path = os.path.join(PRESETS_DIR, f'{path}.py')
  if not os.path.isfile(path):
    raise TrainConfigError(f'config file {path} not found')
  if not path.endswith('.py'):
    raise TrainConfigError(
      f'config file {path}: a config is a Python file (.py) defining get_config(run_dir)'
    )
  spec = importlib.util.spec_from_file_location(
    f'_flmjax_cfg_{os.path.splitext(os.path.basename(path))[0]}', path
  )
  module = importlib.util.module_from_spec(spec)
  default_dir = os.path.join('runs', os.path.splitext(os.path.basename(path))[0])
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise TrainConfigError(f'{path}: defines no get_config(run_dir) function')
    cfg = module.get_config(run_dir or default_dir, **kwargs)
  except TrainConfigError as e:
    where = _where(path, e)
    raise TrainConfigError(str(e) if str(e).startswith(path) else f'{where}: {e}') from None
  except SyntaxError as e:
    raise TrainConfigError(f'{e.filename or path}:{e.lineno}: syntax error: {e.msg}') from None
  except Exception as e:  # a config file is user code: name where it failed, not a traceback
    message = (
      _unknown_field(e) if isinstance(e, TypeError) else None
    ) or f'{type(e).__name__}: {e}'
    raise TrainConfigError(f'{_where(path, e)}: {message}') from None
  if not isinstance(cfg, TrainConfig):
    raise TrainConfigError(f'{path}: get_config returned {type(cfg).__name__}, not TrainConfig')
  return cfg

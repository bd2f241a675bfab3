"""flmjax: FLM-Audio in JAX/Flax.

The public names load on first use (PEP 562), so `flmjax --help`, a bad flag or a busy port is
reported without importing jax and the model first."""

import importlib

_PUBLIC = {
  # errors: every flmjax error is a FlmjaxError and keeps its builtin base (ValueError, ...)
  'FlmjaxError': 'flmjax.errors',
  'CheckpointError': 'flmjax.checkpoint',
  'CorruptCheckpointError': 'flmjax.checkpoint',
  'ConfigError': 'flmjax.config',
  # the model and its config
  'ModelConfig': 'flmjax.config',
  'stream_delays': 'flmjax.config',
  'FLMAudio': 'flmjax.model',
  'Output': 'flmjax.model',
  'LoraConfig': 'flmjax.model.lora',
  'merge_lora': 'flmjax.model.transforms',
  # checkpoints: the official layout, a training run, Mimi
  'load_official': 'flmjax.checkpoint',
  'official_shapes': 'flmjax.checkpoint',
  'save_official': 'flmjax.checkpoint',
  'restore_model': 'flmjax.checkpoint.restore',
  'load_mimi': 'flmjax.codec',
  # decoding and evaluation
  'SamplingConfig': 'flmjax.decode',
  'StreamingDecoder': 'flmjax.decode',
  'teacher_forced': 'flmjax.eval.teacher_forced',
  'turn_taking': 'flmjax.eval',
}
__all__ = sorted(_PUBLIC)
__version__ = '0.1.0'


_RENAMED = {'merge_lora': 'merge'}  # public name -> the name in its module


def __getattr__(name: str):
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

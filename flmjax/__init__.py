"""flmjax: FLM-Audio in JAX/Flax.

The public names load on first use (PEP 562), so `flmjax --help`, a bad flag or a busy port is
reported without importing jax and the model first."""

import importlib

_PUBLIC = {
  'CheckpointError': 'flmjax.checkpoint',
  'CorruptCheckpointError': 'flmjax.checkpoint',
  'load_official': 'flmjax.checkpoint',
  'official_shapes': 'flmjax.checkpoint',
  'save_official': 'flmjax.checkpoint',
  'ConfigError': 'flmjax.config',
  'ModelConfig': 'flmjax.config',
  'stream_delays': 'flmjax.config',
  'FLMAudio': 'flmjax.model',
  'Output': 'flmjax.model',
}
__all__ = sorted(_PUBLIC)
__version__ = '0.1.0'


def __getattr__(name: str):
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

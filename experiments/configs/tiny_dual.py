"""The embedded default, which ships inside the package (flmjax/configs/tiny_dual.py): this file
keeps `--config experiments/configs/tiny_dual.py` working beside the other configs."""

from flmjax.configs.tiny_dual import (
  ARM8,
  DEFAULT,
  LAYOUTS,
  LEAD_FRAMES,
  TRAIL_FRAMES,
  get_config,
  recipe,
)

__all__ = ['ARM8', 'DEFAULT', 'LAYOUTS', 'LEAD_FRAMES', 'TRAIL_FRAMES', 'get_config', 'recipe']

"""Which JAX backend a command should use, decided before jax is imported."""
from __future__ import annotations

import glob
import importlib.util
import os
import sys


def tpu_chips_present() -> bool:
  """TPU VMs expose their chips as /dev/accel* (v4, v5e) or /dev/vfio/N (v5p, v6e)."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def cpu_unless_accelerator(env=os.environ) -> None:
  """With libtpu installed (the [tpu] extra) on a host without TPU chips or a GPU plugin, JAX
  would start by probing for a TPU and log warnings; pin such hosts to the CPU backend instead.
  An explicit JAX_PLATFORMS always wins; `flmjax aot` only compiles for TPUs, never runs on one."""
  if env.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None:
    return
  gpu_plugin = any(importlib.util.find_spec(p) for p in ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                                                         'jax_rocm60_plugin'))
  if not tpu_chips_present() and not gpu_plugin:
    env['JAX_PLATFORMS'] = 'cpu'
    if 'jax' in sys.modules and env is os.environ:  # jax read its env at import (flmjax imports
      sys.modules['jax'].config.update('jax_platforms', 'cpu')  # it): set the flag too

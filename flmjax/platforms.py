"""Which JAX backend a command uses (decided before jax is imported), and what to avoid on it."""

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
  gpu_plugin = any(
    importlib.util.find_spec(p)
    for p in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin')
  )
  if not tpu_chips_present() and not gpu_plugin:
    env['JAX_PLATFORMS'] = 'cpu'
    if 'jax' in sys.modules and env is os.environ:  # jax read its env at import (flmjax imports
      sys.modules['jax'].config.update('jax_platforms', 'cpu')  # it): set the flag too


def compile_fresh_on_cpu_mesh(log=print) -> bool:
  """Turns off jax's persistent compilation cache for this process when it runs on several CPU
  devices (simulated with --xla_force_host_platform_device_count, or CPU processes of one job);
  returns whether it did.

  Why: with jax 0.10.2, an XLA:CPU train step loaded from that cache aborted in a collective
  rendezvous (some devices in an all-gather, the rest in a collective permute), where the same
  program compiled fresh runs; a LoRA run resumed in a new process hit it every time. Call after
  jax.distributed is initialized and before the first compilation.
  """
  import jax

  if not (jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache):
    return False
  if jax.default_backend() != 'cpu' or jax.device_count() < 2:
    return False
  jax.config.update('jax_enable_compilation_cache', False)
  log(
    f'the persistent compilation cache ({jax.config.jax_compilation_cache_dir}) is off for '
    'this run: XLA:CPU steps with collectives loaded from it can deadlock (docs/training.md)'
  )
  return True

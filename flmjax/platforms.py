"""Which JAX backend a command uses (decided before jax is imported), and what to avoid on it."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = '0x1ae0'  # TPU chips; jax's hardware_utils reads the same files


def tpu_chips_present(root: str = '/') -> bool:
  """TPU VMs expose their chips as /dev/accel* (v4, v5e) or /dev/vfio/N (v5p, v6e); a vfio
  device counts only beside a Google PCI device (vfio also passes through other hardware)."""
  at = lambda pattern: glob.glob(os.path.join(root, pattern))
  if at('dev/accel*'):
    return True
  return bool(at('dev/vfio/[0-9]*')) and any(
    _read(v) == GOOGLE_PCI_VENDOR for v in at('sys/bus/pci/devices/*/vendor')
  )


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ''


# GPU plugin -> (its JAX platform, a device file present when such a GPU is visible)
GPU_PLUGINS = {
  'jax_cuda12_plugin': ('cuda', 'dev/nvidia[0-9]*'),
  'jax_cuda13_plugin': ('cuda', 'dev/nvidia[0-9]*'),
  'jax_rocm60_plugin': ('rocm', 'dev/kfd'),
}


def cpu_unless_accelerator(env=os.environ, root: str = '/', find_spec=None) -> str | None:
  """With libtpu installed (the [tpu] extra) on a host without TPU chips, JAX would start by
  loading libtpu, which logs that it cannot find a TPU (a WARNING and an E0000 line, on every
  command): leave the TPU out of JAX_PLATFORMS instead, keeping a visible GPU. Returns the one
  line to show when that leaves only the CPU (None otherwise). An explicit JAX_PLATFORMS always
  wins; `flmjax aot` only compiles for TPUs, never runs on one."""
  find_spec = find_spec or importlib.util.find_spec
  if env.get('JAX_PLATFORMS') or find_spec('libtpu') is None or tpu_chips_present(root):
    return None
  gpus = [
    platform
    for plugin, (platform, device) in GPU_PLUGINS.items()
    if find_spec(plugin) is not None and glob.glob(os.path.join(root, device))
  ]
  env['JAX_PLATFORMS'] = ','.join(dict.fromkeys(gpus + ['cpu']))
  if 'jax' in sys.modules and env is os.environ:  # jax read its env at import (flmjax imports
    sys.modules['jax'].config.update('jax_platforms', env['JAX_PLATFORMS'])  # it): the flag too
  if gpus:
    return None
  return 'libtpu is installed, but this machine has no TPU chips: running on the CPU'


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

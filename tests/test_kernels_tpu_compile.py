"""The Pallas TPU depth kernel through the real TPU compiler (libtpu; no TPU needed): at flm_8b's
depth shapes in bf16 the compiled program hands the weights to the kernel in place, with no
weight-sized copy (a re-layout) before it. A control with the unpadded MLP (2730 units) shows
the check catching the copies TPUs make for a layout they do not store."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies

from flmjax.config import ModelConfig
from flmjax.kernels import depth_tpu

pytestmark = pytest.mark.slow  # Mosaic lowering for TPU

# `%name = shape opcode(`; a tuple shape for async copies.
_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\(')
_ARRAY = re.compile(r'\b(bf16|f32|s32|u32|pred)\[([\d,]*)\]')
_ITEMSIZE = {'bf16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'pred': 1}


def copies(hlo: str, min_bytes: int) -> list[str]:
  """Instructions that copy or transpose a buffer of at least min_bytes."""
  found = []
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if not m or not (
      m.group(3) in ('copy', 'copy-start', 'transpose')
      or m.group(1).startswith(('copy', 'transpose'))
    ):
      continue
    sizes = [
      _ITEMSIZE[t] * int(np.prod([int(n) for n in dims.split(',') if n]))
      for t, dims in _ARRAY.findall(m.group(2))
    ]
    if max(sizes, default=0) >= min_bytes:
      found.append(line.strip()[:160])
  return found


def compile_stack(topology: str, mlp: int, batch: int = 8):
  """The whole-stack kernel (what the decoder runs) for one chip of `topology`, MLP width mlp."""
  cfg = ModelConfig.flm_8b()
  L, C, d, h, e = (
    cfg.depth_layers,
    cfg.num_codebooks,
    cfg.depth_dim,
    cfg.depth_heads,
    cfg.depth_head_dim,
  )
  device = topologies.get_topology_desc(platform='tpu', topology_name=topology).devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  s = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  p = {
    'ln_1': s(L, d),
    'qkv': s(L, 3, d, h * e),
    'proj': s(L, h, e, d),
    'ln_2': s(L, d),
    'gate': s(L, C, d, mlp),
    'up': s(L, C, d, mlp),
    'down': s(L, C, mlp, d),
  }
  cache = s(L, batch, C, h, e)
  fn = jax.jit(functools.partial(depth_tpu.layers_step, eps=cfg.depth_rms_eps))
  compiled = fn.lower(p, s(batch, d), cache, cache, s(dt=jnp.int32)).compile()
  smallest = 2 * min(L * d * 3 * h * e, L * h * e * d, L * C * d * mlp)  # bytes of a weight
  return compiled, smallest


@pytest.mark.parametrize('topology', ['v5e:2x2', 'v6e:8x8'])
def test_compiled_kernel_copies_no_weight(topology):
  mlp = ModelConfig.flm_8b().padded_depth_mlp_dim
  assert mlp == 2816  # 2730 padded to whole 128-lane tiles
  compiled, smallest = compile_stack(topology, mlp)
  text = compiled.as_text()
  assert 'custom_call_target="tpu_custom_call"' in text  # the Mosaic kernel is in the program
  assert copies(text, smallest) == []
  assert compiled.memory_analysis().temp_size_in_bytes < smallest


def test_unpadded_mlp_is_copied_before_the_kernel():
  """The check can fail: with 2730 units TPUs store gate/up/down in another layout, so the
  compiled program re-lays them out (48 matrices each, every call)."""
  compiled, smallest = compile_stack('v5e:2x2', ModelConfig.flm_8b().depth_mlp_dim)
  found = copies(compiled.as_text(), smallest)
  assert sum(' copy(%p__' in line and '2730' in line for line in found) == 3  # gate, up, down

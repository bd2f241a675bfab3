"""The kernels lower through the real Triton (cuda) and Mosaic (tpu) compilers' front ends.

No GPU or TPU runs here, but jax.export lowers for another platform on CPU: that runs the Pallas
Triton / Mosaic lowering rules (power-of-two tiles, supported ops, block shapes, scalar prefetch)
on the flm_8b depth shapes in bf16 and on the tiny ones, without executing anything.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from flmjax.config import ModelConfig
from flmjax.kernels import depth_step

ALLOW = [
  jax.export.DisabledSafetyCheck.custom_call(name)
  for name in ('triton_kernel_call', '__gpu$xla.gpu.triton', 'tpu_custom_call')
]


def abstract_layer(cfg: ModelConfig, b: int):
  d, h, e, f, C = (
    cfg.depth_dim,
    cfg.depth_heads,
    cfg.depth_head_dim,
    cfg.padded_depth_mlp_dim,
    cfg.num_codebooks,
  )
  s = lambda *shape: jax.ShapeDtypeStruct(shape, cfg.compute_dtype)
  p = {
    'ln_1': s(d),
    'qkv': s(3, d, h * e),
    'proj': s(h, e, d),
    'ln_2': s(d),
    'gate': s(C, d, f),
    'up': s(C, d, f),
    'down': s(C, f, d),
  }
  return p, s(b, d), s(b, C, h, e), s(b, C, h, e), jax.ShapeDtypeStruct((), jnp.int32)


@pytest.mark.parametrize(
  'platform,tiles,custom_call,count',
  [
    ('cuda', {}, '__gpu$xla.gpu.triton', 5),
    ('cuda', dict(fuse_attention=True), '__gpu$xla.gpu.triton', 4),
    ('tpu', {}, 'tpu_custom_call', 1),
  ],
  ids=['cuda', 'cuda-fused', 'tpu'],
)
@pytest.mark.parametrize(
  'cfg,b',
  [(ModelConfig.flm_8b(), 1), (ModelConfig.flm_8b(), 128), (ModelConfig.tiny(), 3)],
  ids=['8b-B1', '8b-B128', 'tiny-B3'],
)
def test_lowers_for_platform(platform, tiles, custom_call, count, cfg, b):
  """One layer through select_depth_layer_fn."""
  layer = depth_step.select_depth_layer_fn(backend=platform, **tiles)
  fn = jax.jit(functools.partial(layer, eps=cfg.depth_rms_eps))
  exported = jax.export.export(fn, platforms=[platform], disabled_checks=ALLOW)(
    *abstract_layer(cfg, b)
  )
  calls = exported.mlir_module().count(f'custom_call @{custom_call}(')
  assert calls == count, f'{calls} {custom_call} calls, want {count}'


@pytest.mark.parametrize(
  'platform,custom_call,calls',
  [('cuda', '__gpu$xla.gpu.triton', 5 * 6), ('tpu', 'tpu_custom_call', 1)],
)
def test_stack_lowers_for_platform(platform, custom_call, calls):
  """The whole flm_8b stack through select_depth_layers_fn: stacked weights indexed in place."""
  cfg = ModelConfig.flm_8b()
  p, x, kc, vc, c = abstract_layer(cfg, 8)
  stack = lambda a: jax.ShapeDtypeStruct((cfg.depth_layers, *a.shape), a.dtype)
  layers = depth_step.select_depth_layers_fn(backend=platform)
  fn = jax.jit(functools.partial(layers, eps=cfg.depth_rms_eps))
  exported = jax.export.export(fn, platforms=[platform], disabled_checks=ALLOW)(
    jax.tree.map(stack, p), x, stack(kc), stack(vc), c
  )
  text = exported.mlir_module()
  assert text.count(f'custom_call @{custom_call}(') == calls  # Triton: 5 a layer; TPU: 1 in all
  assert 'dynamic_slice' not in text  # no per-layer weight slice is copied before a kernel

"""Pallas depth-layer kernels (interpret mode) against the model's own layer_step.

Inputs are random draws from a fixed seed (the `seed` fixture of conftest.py: 0, or
KERNEL_TEST_SEED to try another; the seed is printed on failure). Interpret mode fills every
output buffer with NaN before the kernel runs (checked by
test_interpret_mode_poisons_unwritten_outputs), so an element a kernel forgets to write shows up as
NaN and fails both the finiteness and the tolerance checks.

Checks per output (x, and the cache row written at position c; every other cache row must come
back bit-identical to the input):
- float32: max|kernel - ref| / max|ref| < 1e-5.
- bfloat16: ||kernel - ref|| / ||ref|| < 2e-2, and elementwise max|kernel - ref| / max|ref| < 5e-2.
  Both paths round the same ~8 intermediates per layer to bf16, each of them independently
  about 0.6% off the f32 result. The elementwise maximum alone sits near 2e-2 about once in
  3000 draws (measured), so a per-element bound of 2e-2 would be flaky, not stricter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flmjax.kernels import depth_step
from flmjax.kernels.reference import depth_layer_step as reference

pytestmark = pytest.mark.slow  # Pallas kernels in interpret mode, many variants

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # see the module docstring for the metrics
BF16_ELEMENTWISE = 5e-2
EPS = 1e-6
C = 8
# (d, heads, f): the tiny config's depth dims, and a non-power-of-two case (head dim 10) whose f
# is cut into ragged tiles by the small tile sizes below.
TINY = (32, 4, int(8 * 32 / 3))
ODD = (40, 4, 106)
# Variant -> (kernel, tiles per dims). The small tiles make f ragged, and several tiles per dim.
VARIANTS = {
  'tpu': ('tpu', {TINY: {}, ODD: dict(heads_per_block=2, f_block=32)}),
  'gpu': ('gpu', {TINY: {}, ODD: dict(kb=16, nb=16)}),
  'gpu_fused': (
    'gpu',
    {TINY: dict(fuse_attention=True), ODD: dict(kb=16, nb=16, fuse_attention=True)},
  ),
}


def random_layer(seed, b, dims, dtype):
  d, h, f = dims
  e = d // h
  rng = np.random.default_rng(seed)  # numpy: no per-shape compiles for the draws
  n = lambda shape, scale: jnp.asarray(scale * rng.standard_normal(shape, np.float32), dtype)
  p = {
    'ln_1': 1 + n((d,), 0.1),
    'qkv': n((3, d, h * e), d**-0.5),
    'proj': n((h, e, d), d**-0.5),
    'ln_2': 1 + n((d,), 0.1),
    'gate': n((C, d, f), d**-0.5),
    'up': n((C, d, f), d**-0.5),
    'down': n((C, f, d), f**-0.5),
  }
  return p, n((b, d), 1.0), n((b, C, h, e), 1.0), n((b, C, h, e), 1.0)


@functools.cache
def compiled(variant, dims, interpret='plain'):
  """One jitted function per variant and tiling, shared by tests; c stays a traced argument."""
  if variant == 'reference':
    return jax.jit(functools.partial(reference, eps=EPS))
  mode = pltpu.InterpretParams() if interpret == 'tpu_params' else True
  kernel, tiles = VARIANTS[variant]
  return jax.jit(
    functools.partial(
      depth_step.depth_layer_step, eps=EPS, kernel=kernel, interpret=mode, **tiles[dims]
    )
  )


def rel_err(want, got):
  """Elementwise: max|want - got| / max|want|."""
  want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
  return float(np.max(np.abs(want - got)) / np.max(np.abs(want)))


def norm_rel_err(want, got):
  want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
  return float(np.linalg.norm(want - got) / np.linalg.norm(want))


def assert_close(want, got, dtype, what):
  assert np.isfinite(np.asarray(got, np.float32)).all(), f'{what}: non-finite (unwritten?)'
  elementwise, normwise = rel_err(want, got), norm_rel_err(want, got)
  if dtype == jnp.float32:
    assert elementwise < TOL[dtype], f'{what}: rel err {elementwise:.2e}'
  else:
    assert normwise < TOL[dtype], f'{what}: norm rel err {normwise:.2e}'
    assert elementwise < BF16_ELEMENTWISE, f'{what}: elementwise rel err {elementwise:.2e}'


def check_outputs(want, got, caches, c, dtype, what):
  """want/got: (x, k_cache, v_cache) of the reference and the kernel; caches: the inputs.
  Caches are [..., C, h, e]: row c is compared with tolerance, the others must be unchanged."""
  for name, w, g, before in zip(('x', 'k_cache', 'v_cache'), want, got, (None, *caches)):
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype)
    w, g = np.asarray(w.astype(jnp.float32)), np.asarray(g.astype(jnp.float32))
    if before is not None:
      others = np.arange(C) != c
      before = np.asarray(before.astype(jnp.float32))
      np.testing.assert_array_equal(
        np.compress(others, g, axis=-3), np.compress(others, before, axis=-3), f'{what} {name}'
      )
      w, g = np.take(w, c, axis=-3), np.take(g, c, axis=-3)
    assert_close(w, g, dtype, f'{what} {name} c={c}')


def check_every_position(kernel, dims, b, dtype, seed, interpret='plain'):
  p, x, kc, vc = random_layer(seed, b, dims, dtype)
  ref, fn = compiled('reference', dims), compiled(kernel, dims, interpret)
  for c in range(C):
    want = ref(p, x, kc, vc, jnp.int32(c))
    got = fn(p, x, kc, vc, jnp.int32(c))
    check_outputs(want, got, (kc, vc), c, dtype, f'{kernel} B={b} dims={dims}')


# Every B x dims for the two kernel sets; the fused-attention variant of the Triton set on three
# of the six (it shares all but its first kernel with 'gpu'), to keep CI time down.
F32_CASES = [(k, dims, b) for k in ('tpu', 'gpu') for dims in (TINY, ODD) for b in (1, 3, 8)]
F32_CASES += [('gpu_fused', TINY, 1), ('gpu_fused', ODD, 3), ('gpu_fused', TINY, 8)]
F32_IDS = [f'{k}-{"tiny" if d == TINY else "odd"}-B{b}' for k, d, b in F32_CASES]


@pytest.mark.parametrize('kernel,dims,b', F32_CASES, ids=F32_IDS)
def test_float32_every_codebook(kernel, dims, b, seed):
  check_every_position(kernel, dims, b, jnp.float32, seed)


@pytest.mark.parametrize('kernel', list(VARIANTS))
@pytest.mark.parametrize('dims', [TINY, ODD], ids=['tiny', 'odd'])
def test_bfloat16_every_codebook(kernel, dims, seed):
  check_every_position(kernel, dims, 3, jnp.bfloat16, seed)


def test_tpu_kernel_under_tpu_interpret_params(seed):
  """The Mosaic kernel under the TPU interpreter (VMEM/SMEM semantics, NaN-filled buffers)."""
  check_every_position('tpu', ODD, 3, jnp.float32, seed, interpret='tpu_params')


@pytest.mark.parametrize('mode', [True, pltpu.InterpretParams()], ids=['plain', 'tpu_params'])
def test_interpret_mode_poisons_unwritten_outputs(mode):
  """What the tests above rely on: an output element no kernel writes comes back NaN."""

  def half_writer(x_ref, o_ref):
    o_ref[:4, :] = x_ref[:4, :]

  out = pl.pallas_call(
    half_writer, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=mode
  )(jnp.ones((8, 128), jnp.float32))
  out = np.asarray(out)
  assert (out[:4] == 1).all() and np.isnan(out[4:]).all()


@pytest.mark.parametrize('kernel', ['tpu', 'gpu'])
def test_grad_matches_reference(kernel, seed):
  """Under jax.grad the kernel's custom_vjp differentiates through the reference."""
  p, x, kc, vc = random_layer(seed, 3, TINY, jnp.float32)
  c = jnp.int32(5)
  w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(x.shape, np.float32))

  def loss(layer, p, x, kc, vc):
    out, k2, v2 = layer(p, x, kc, vc, c, EPS)
    return jnp.sum(out * w) + jnp.sum(k2**2) + jnp.sum(v2 * 0.5)

  layer = functools.partial(
    depth_step.depth_layer_step, kernel=kernel, interpret=True, **VARIANTS[kernel][1][TINY]
  )
  want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2, 3))(p, x, kc, vc)
  got = jax.jit(jax.grad(functools.partial(loss, layer), argnums=(0, 1, 2, 3)))(p, x, kc, vc)
  for path, w_leaf in jax.tree_util.tree_leaves_with_path(want):
    g_leaf = functools.reduce(lambda t, k: t[k.key if hasattr(k, 'key') else k.idx], path, got)
    assert rel_err(w_leaf, g_leaf) < 1e-5, jax.tree_util.keystr(path)


def test_select_on_cpu():
  """CPU: the reference unless interpret mode is asked for; a named kernel is honoured."""
  p, x, kc, vc = random_layer(0, 2, TINY, jnp.float32)
  args = (p, x, kc, vc, jnp.int32(2))
  jaxpr = lambda **kw: str(
    jax.make_jaxpr(functools.partial(depth_step.select_depth_layer_fn(**kw), eps=EPS))(*args)
  )
  assert jax.default_backend() == 'cpu'
  assert 'pallas_call' not in jaxpr()  # the reference
  assert 'depth_step_tpu' in jaxpr(interpret=True)
  assert 'depth_mlp_in' in jaxpr(backend='gpu', interpret=True)  # the Triton kernel set
  assert 'depth_step_tpu' in jaxpr(backend='tpu', interpret=True)
  assert 'depth_mlp_in' in jaxpr(kernel='gpu', interpret=True)


def test_bad_arguments_name_the_problem():
  p, x, kc, vc = random_layer(0, 2, TINY, jnp.float32)
  with pytest.raises(ValueError, match="unknown backend 'metal'"):
    depth_step.select_depth_layer_fn(backend='metal')
  with pytest.raises(ValueError, match="unknown kernel 'cuda'"):
    depth_step.select_depth_layer_fn(kernel='cuda')
  with pytest.raises(ValueError, match="unknown depth kernel 'triton'"):
    depth_step.depth_layer_step(p, x, kc, vc, 0, EPS, kernel='triton')
  with pytest.raises(ValueError, match='kb=24 and nb=32 must be powers of two'):
    depth_step.depth_layer_step(p, x, kc, vc, 0, EPS, kernel='gpu', interpret=True, kb=24)
  with pytest.raises(ValueError, match='heads_per_block 3 does not divide the 4 depth heads'):
    depth_step.depth_layer_step(
      p, x, kc, vc, 0, EPS, kernel='tpu', interpret=True, heads_per_block=3
    )

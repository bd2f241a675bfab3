"""The whole-stack entry (select_depth_layers_fn / depth_layers_step): the TPU kernel runs all
layers in one call, the Triton kernels run per layer reading the stacked [L,...] weights and
caches in place. Checked in interpret mode against
flmjax.model.depth.layers_step (the scan DepthTransformer.step runs), with the tolerances, fresh
seeds and NaN-poisoned outputs of test_kernels_depth.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_depth import EPS, ODD, TINY, VARIANTS, C, check_outputs, rel_err

from flmjax.kernels import depth_step
from flmjax.kernels.reference import depth_layers_step as reference

pytestmark = pytest.mark.slow  # Pallas kernels in interpret mode over stacked layers

LAYERS = 2


def random_stack(seed, b, dims, dtype):
  d, h, f = dims
  e = d // h
  rng = np.random.default_rng(seed)
  n = lambda shape, scale: jnp.asarray(scale * rng.standard_normal(shape, np.float32), dtype)
  L = LAYERS
  p = {
    'ln_1': 1 + n((L, d), 0.1),
    'qkv': n((L, 3, d, h * e), d**-0.5),
    'proj': n((L, h, e, d), d**-0.5),
    'ln_2': 1 + n((L, d), 0.1),
    'gate': n((L, C, d, f), d**-0.5),
    'up': n((L, C, d, f), d**-0.5),
    'down': n((L, C, f, d), f**-0.5),
  }
  return p, n((b, d), 1.0), n((L, b, C, h, e), 1.0), n((L, b, C, h, e), 1.0)


@functools.cache
def compiled(variant, dims):
  if variant == 'reference':
    return jax.jit(functools.partial(reference, eps=EPS))
  kernel, tiles = VARIANTS[variant]
  return jax.jit(
    functools.partial(
      depth_step.depth_layers_step, eps=EPS, kernel=kernel, interpret=True, **tiles[dims]
    )
  )


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize(
  'dims,b,dtype',
  [(TINY, 8, jnp.float32), (ODD, 3, jnp.float32), (ODD, 1, jnp.bfloat16)],
  ids=['tiny-B8-f32', 'odd-B3-f32', 'odd-B1-bf16'],
)
def test_stack_every_codebook(variant, dims, b, dtype, seed):
  p, x, kc, vc = random_stack(seed, b, dims, dtype)
  ref, fn = compiled('reference', dims), compiled(variant, dims)
  for c in range(C):
    want = ref(p, x, kc, vc, jnp.int32(c))
    got = fn(p, x, kc, vc, jnp.int32(c))
    check_outputs(want, got, (kc, vc), c, dtype, f'{variant} B={b} dims={dims}')


def test_stack_grad_matches_reference(seed):
  p, x, kc, vc = random_stack(seed, 3, TINY, jnp.float32)
  c = jnp.int32(6)
  w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(x.shape, np.float32))

  def loss(layers, p, x, kc, vc):
    out, k2, v2 = layers(p, x, kc, vc, c, EPS)
    return jnp.sum(out * w) + jnp.sum(k2**2) + jnp.sum(v2 * 0.5)

  layers = depth_step.select_depth_layers_fn(kernel='gpu', interpret=True)
  want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2, 3))(p, x, kc, vc)
  got = jax.jit(jax.grad(functools.partial(loss, layers), argnums=(0, 1, 2, 3)))(p, x, kc, vc)
  flat_want, flat_got = jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)
  assert len(flat_want) == len(flat_got)
  for i, (a, g) in enumerate(zip(flat_want, flat_got)):
    assert rel_err(a, g) < 1e-5, i


def test_select_layers_on_cpu():
  p, x, kc, vc = random_stack(0, 2, TINY, jnp.float32)
  jaxpr = lambda **kw: str(
    jax.make_jaxpr(functools.partial(depth_step.select_depth_layers_fn(**kw), eps=EPS))(
      p, x, kc, vc, jnp.int32(1)
    )
  )
  assert 'pallas_call' not in jaxpr()
  assert jaxpr(interpret=True).count('pallas_call') == 1  # one TPU kernel for the whole stack
  assert jaxpr(kernel='gpu', interpret=True).count('pallas_call') == 5 * LAYERS  # Triton set
  with pytest.raises(ValueError, match="unknown backend 'metal'"):
    depth_step.select_depth_layers_fn(backend='metal')

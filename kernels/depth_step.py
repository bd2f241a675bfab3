"""The fused depth-layer step: backend selection and autodiff for the Pallas kernels.

`select_depth_layer_fn()` returns a drop-in for flmjax.model.depth.layer_step (one layer; the
`layer_fn` of DepthTransformer.step), `select_depth_layers_fn()` one for layers_step (the whole
stack; its `layers_fn`, which hands the kernels the stacked weights so that no per-layer slice is
copied). Both pick at trace time the Mosaic TPU kernel (kernels/depth_tpu.py) on TPU, the Triton
kernels (kernels/depth_gpu.py) on GPU, and the plain-JAX reference on CPU unless interpret mode is
asked for. Every kernel path differentiates through the reference (custom_vjp), so training may
call it under jax.grad.

A Pallas call is opaque to XLA's partitioner: under a sharded jit its operands would be gathered to
every device. So when a mesh is in context (flmjax.sharding.traced_on, as the decoder and the
server trace their frames) each kernel runs inside `shard_map` over the batch rows: the depth
weights replicated (the decoder stores them so, see flmjax.decode.decoder), the rows split over
the batch axes and, when the rows divide, over tensor too, so no device computes a row twice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd
from flmjax.kernels import depth_gpu, depth_tpu
from flmjax.kernels.reference import depth_layer_step as reference_layer_step
from flmjax.kernels.reference import depth_layers_step as reference_layers_step

KERNELS = {'tpu': depth_tpu.layer_step, 'gpu': depth_gpu.layer_step}
# Kernels that run the whole stack in one call (the others loop over layers, reading in place).
STACK_KERNELS = {'tpu': depth_tpu.layers_step}
_BACKEND_KERNEL = {'tpu': 'tpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu'}

LayerFn = Callable  # (p, x [B,d], k_cache [(L,)B,C,h,e], v_cache, c, eps) -> (x, k_cache, v_cache)


def with_reference_vjp(forward: LayerFn, reference: LayerFn = reference_layer_step) -> LayerFn:
  """`forward` for the values, `reference`'s VJP for the gradients."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def step(p, x, k_cache, v_cache, c, eps):
    return forward(p, x, k_cache, v_cache, c, eps)

  def fwd(p, x, k_cache, v_cache, c, eps):
    return forward(p, x, k_cache, v_cache, c, eps), (p, x, k_cache, v_cache, c)

  def bwd(eps, res, grads):
    p, x, k_cache, v_cache, c = res
    _, vjp = jax.vjp(lambda p, x, k, v: reference(p, x, k, v, c, eps), p, x, k_cache, v_cache)
    return (*vjp(grads), None)  # c is an integer position: no cotangent

  step.defvjp(fwd, bwd)
  return step


def _kernel(kernel: str, interpret, tiles: dict) -> Callable:
  if kernel not in KERNELS:
    raise ValueError(f'unknown depth kernel {kernel!r}; choose one of {sorted(KERNELS)}')
  return functools.partial(KERNELS[kernel], interpret=interpret, **tiles)


def depth_layer_step(p, x, k_cache, v_cache, c, eps, *, kernel: str, interpret=False, **tiles):
  """One depth layer through kernel 'tpu' or 'gpu' (differentiable via the reference).

  `tiles` go to that kernel (depth_tpu: heads_per_block, f_block; depth_gpu: kb, nb, ...).
  """
  forward = _kernel(kernel, interpret, tiles)
  return with_reference_vjp(forward)(p, x, k_cache, v_cache, c, eps)


def depth_layers_step(p, x, k_cache, v_cache, c, eps, *, kernel: str, interpret=False, **tiles):
  """All layers: p's leaves stacked [L,...], caches [L,B,C,h,e]. 'tpu' runs them in one kernel;
  'gpu' unrolls the layer loop, each layer's kernels reading layer l of the stacks in place."""
  one = _kernel(kernel, interpret, tiles)

  def forward(p, x, k_cache, v_cache, c, eps):
    if kernel in STACK_KERNELS:
      return STACK_KERNELS[kernel](p, x, k_cache, v_cache, c, eps, interpret=interpret, **tiles)
    for layer in range(k_cache.shape[0]):
      x, k_cache, v_cache = one(p, x, k_cache, v_cache, c, eps, layer=layer)
    return x, k_cache, v_cache

  return with_reference_vjp(forward, reference_layers_step)(p, x, k_cache, v_cache, c, eps)


def row_axes(mesh, rows: int):
  """The mesh axes a kernel's rows split over: the rules' batch axes, then tensor when the rows
  divide over all of them (None: no split)."""
  batch = shd.logical_to_spec(('activation_batch',), (rows,), mesh)[0]
  axes = () if batch is None else ((batch,) if isinstance(batch, str) else tuple(batch))
  ways = math.prod(mesh.shape[a] for a in axes)
  if mesh.shape.get('tensor', 1) > 1 and rows % (ways * mesh.shape['tensor']) == 0:
    axes += ('tensor',)
  return axes or None


def under_mesh(fn: LayerFn, stacked: bool) -> LayerFn:
  """`fn` (a kernel step) inside shard_map over the rows of the mesh in context; `fn` itself when
  there is none. p replicated; x [B,d] and the caches ([L,]B,C,h,e) split on B."""

  def step(p, x, k_cache, v_cache, c, eps):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return fn(p, x, k_cache, v_cache, c, eps)
    rows = row_axes(mesh, x.shape[0])
    xs, cs = P(rows, None), P(*((None,) if stacked else ()), rows)
    local = lambda p, x, k, v, c: fn(p, x, k, v, c, eps)
    return jax.shard_map(
      local, mesh=mesh, in_specs=(P(), xs, cs, cs, P()), out_specs=(xs, cs, cs), check_vma=False
    )(p, x, k_cache, v_cache, c)

  return step


def _check(backend, kernel):
  for name, value, known in (
    ('backend', backend, {'cpu', *_BACKEND_KERNEL}),
    ('kernel', kernel, set(KERNELS)),
  ):
    if value is not None and value not in known:
      raise ValueError(
        f'select_depth_layer_fn: unknown {name} {value!r}; use one of {sorted(known)}'
      )


def _pick(backend, kernel, interpret) -> str | None:
  """The kernel for the platform traced on; None (the reference) on CPU without interpret."""
  platform = backend or jax.default_backend()
  return kernel or _BACKEND_KERNEL.get(platform) or ('tpu' if interpret else None)


def select_depth_layer_fn(
  *, interpret=False, backend: str | None = None, kernel: str | None = None, **tiles
) -> LayerFn:
  """A function with layer_step's signature for the platform it is traced on.

  backend: 'cpu' | 'gpu' | 'cuda' | 'rocm' | 'tpu'; None reads jax.default_backend() at trace time.
  kernel: force 'tpu' or 'gpu' (e.g. to run the Triton kernels in interpret mode on CPU);
    None picks the platform's own, and on CPU the reference, or the TPU kernel when `interpret`.
  interpret: run the chosen kernel in Pallas interpret mode (True, or a pltpu.InterpretParams).
  """
  _check(backend, kernel)

  def layer_fn(p, x, k_cache, v_cache, c, eps):
    name = _pick(backend, kernel, interpret)
    if name is None:  # CPU without interpret mode: Pallas cannot compile here
      return reference_layer_step(p, x, k_cache, v_cache, c, eps)
    kernel_fn = functools.partial(depth_layer_step, kernel=name, interpret=interpret, **tiles)
    return under_mesh(kernel_fn, stacked=False)(p, x, k_cache, v_cache, c, eps)

  return layer_fn


def select_depth_layers_fn(
  *, interpret=False, backend: str | None = None, kernel: str | None = None, **tiles
) -> LayerFn:
  """As select_depth_layer_fn, for the whole stack: flmjax.model.depth.layers_step's signature
  (DepthTransformer.step(..., layers_fn=...))."""
  _check(backend, kernel)

  def layers_fn(p, x, k_cache, v_cache, c, eps):
    name = _pick(backend, kernel, interpret)
    if name is None:
      return reference_layers_step(p, x, k_cache, v_cache, c, eps)
    kernel_fn = functools.partial(depth_layers_step, kernel=name, interpret=interpret, **tiles)
    return under_mesh(kernel_fn, stacked=True)(p, x, k_cache, v_cache, c, eps)

  return layers_fn

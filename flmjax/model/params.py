"""Parameter creation with logical axis names (see flmjax/sharding.py for the rules table)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax.model import attention, int8, lora

# Whether the teacher-forced passes run their layers as a lax.scan over the stacked weights
# (None: scanned on TPU and GPU, unrolled on CPU; see unrolled_layers). A switch for benchmarks.
SCAN_LAYERS: bool | None = None


def param(
  rngs: nnx.Rngs | None,
  shape: tuple[int, ...],
  axes: tuple[str | None, ...],
  dtype,
  init: str = 'normal',
  std: float = 0.02,
  real_shape: tuple[int, ...] | None = None,
) -> nnx.Param:
  """A Param carrying `axes` (one logical name per dim) as metadata.

  real_shape: the unpadded extent; `init` fills it (the same draws as an unpadded param) and the
  padding beyond it is exact zeros.
  """
  if len(axes) != len(shape):
    raise ValueError(f'axes {axes} do not match shape {shape}')
  real = tuple(real_shape or shape)
  if init == 'ones':
    value = jnp.ones(real, dtype)
  elif init == 'zeros':
    value = jnp.zeros(real, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), real, jnp.float32)).astype(dtype)
  value = jnp.pad(value, [(0, s - r) for s, r in zip(shape, real)])
  return nnx.Param(value, axes=tuple(axes))


def values(module: nnx.Module, names: tuple[str, ...], dtype) -> dict:
  """The named weights of `module` as the layers compute with them (flmjax.model.weights): an
  array in the compute dtype, or, where a transform of the params left adapters or an int8
  scale beside it, a LoraWeight or Int8Weight (adapters and scales as stored, float32). An int8
  weight stays int8 here: `weights.dense` dequantizes the one layer slice it reads."""
  tree = {}
  cast = lambda w: w if jnp.issubdtype(w.dtype, jnp.integer) else w.astype(dtype)
  for n in names:
    # An array, or split_leading's nested tuples of per-slice arrays.
    tree[n] = jax.tree.map(cast, getattr(module, n).get_value())
    for s in (*lora.SUFFIXES, int8.SUFFIX):
      if hasattr(module, f'{n}{s}'):
        tree[f'{n}{s}'] = getattr(module, f'{n}{s}')[...]
  return lora.wrap(int8.wrap(tree), getattr(module, 'lora_scale', 0.0))


def is_split(w) -> bool:
  """Whether a weight (as `values` gives it) is split_leading's tuple of per-slice buffers."""
  return isinstance(w, tuple)


def split_leading(params: nnx.State, axes: dict[str, int]) -> nnx.State:
  """params with each Param named in `axes` (its path, 'backbone/q') split over its first
  axes[name] axes into nested tuples of separate arrays (w[i][j] == old w[i, j]).

  Why: XLA:CPU's dot reads only whole buffers, so a layer scan (or a codebook loop) over a
  stacked weight copies each step's slice into a fresh buffer before the dot reads it again:
  for the `small` decode frame about 220 MB of copies per frame, of the 300 MB it must read.
  With separate buffers and the loops unrolled (the model checks `is_split`), each dot reads its
  weight where it lies. A new State: the arrays of `params` are not changed."""

  def split(w, depth):
    return w if depth == 0 else tuple(split(w[i], depth - 1) for i in range(w.shape[0]))

  def leaf(path, w):
    name = '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    return split(w, axes[name]) if name in axes else w

  return jax.tree_util.tree_map_with_path(leaf, params)


def unrolled_layers() -> bool:
  """Whether a teacher-forced pass (training, evaluation) loops over its layers in Python over
  `unstack`ed weights instead of a lax.scan: on CPU (the context mesh's platform), unless
  SCAN_LAYERS says otherwise.

  Why: a scan's autodiff stacks each layer's saved activations into [L,...] buffers (zeros
  first, copied into the loop, written with dynamic-update-slice, read back sliced, and XLA:CPU's
  dot copies the slices again): about 1.8 GB of copies a `small` step (issue 26, RESULTS.md).
  Unrolled, they are plain buffers. TPUs and GPUs keep the scan: their dots read slices in place,
  and compile time stays flat in depth.
  """
  if SCAN_LAYERS is not None:
    return not SCAN_LAYERS
  return attention.platform() == 'cpu'


def unstack(tree, n: int) -> list:
  """A pytree of arrays stacked on a leading axis of n -> n pytrees of the slices, through one
  split per leaf (its gradient is one concatenate, not n pads into zeros of the whole stack)."""
  leaves, treedef = jax.tree.flatten(tree)
  parts = [jnp.split(leaf, n, axis=0) for leaf in leaves]
  return [treedef.unflatten([p[i][0] for p in parts]) for i in range(n)]


def loop_layers(layer, carry, stacked: dict, n: int, unrolled: bool, split: bool = False):
  """carry through n layers, `layer(carry, (weights, i)) -> (carry, None)`: a lax.scan over the
  stacked weights, or, if `unrolled`, a Python loop over them (unstacked, or as split_leading
  left them when `split`). Returns the final carry."""
  if not unrolled:
    return jax.lax.scan(layer, carry, (stacked, jnp.arange(n)))[0]
  per_layer = [{k: w[i] for k, w in stacked.items()} for i in range(n)] if split else None
  for i, p in enumerate(per_layer or unstack(stacked, n)):
    carry, _ = layer(carry, (p, i))
  return carry

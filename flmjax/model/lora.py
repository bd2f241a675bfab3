"""LoRA as a transform of a model's weights, in the manner of gemma's peft and qwix.

`attach` adds each target weight's adapters beside it (`q` -> `q_lora_a`, `q_lora_b`, as qwix's
nnx LoRA stores them): A [in, r] drawn normal / sqrt(in) and B [r, out] zeros, both float32, so
B = 0 is the base exactly; they are stacked like the weight over layers and codebooks and named
by the same logical axes, so FSDP and tensor rules shard them like their base. `wrap` reads a
module's weights with their adapters as LoraWeights (flmjax.model.weights), which `dense` and
`rows` compute as `x @ W + (x @ A) @ B * alpha / rank`: the model's layers never name an
adapter. The int8 base is flmjax.model.int8.

Each site below names a weight and the role of each of its dims: b stacked or batched (layers,
codebooks), i input (contracted), o output. A letters = b + i + r, B letters = b + r + o.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flmjax.model.weights import LoraWeight

TARGETS = ('attn', 'mlp', 'depth', 'heads', 'embed')
BASE_DTYPES = ('bfloat16', 'float32', 'int8')
RANK = 'lora_rank'  # the logical axis of r (replicated: see flmjax.sharding.RULES)

# target -> ((module, weight, roles), ...)
SITES = {
  'attn': (
    ('backbone', 'q', 'bioo'),
    ('backbone', 'k', 'bioo'),
    ('backbone', 'v', 'bioo'),
    ('backbone', 'o', 'biio'),
  ),
  'mlp': (('backbone', 'gate', 'bio'), ('backbone', 'up', 'bio'), ('backbone', 'down', 'bio')),
  'depth': (
    ('depth_transformer', 'linear_in', 'ioo'),
    ('depth_transformer', 'qkv', 'boio'),
    ('depth_transformer', 'proj', 'biio'),
    ('depth_transformer', 'gate', 'bbio'),
    ('depth_transformer', 'up', 'bbio'),
    ('depth_transformer', 'down', 'bbio'),
  ),
  'heads': (('backbone', 'lm_head', 'io'), ('depth_transformer', 'heads', 'bio')),
  'embed': (
    ('backbone', 'text_embed', 'io'),
    ('backbone', 'speak_embed', 'bio'),
    ('backbone', 'listen_embed', 'bio'),
    ('depth_transformer', 'wtes', 'bio'),
  ),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA on the named target groups (TARGETS); the rest of the model, the base, is frozen and
  stored in `base_dtype` ('int8': per-channel symmetric weight-only quantization)."""

  rank: int
  alpha: float
  targets: tuple[str, ...] = ('attn', 'mlp')
  dropout: float = 0.0
  base_dtype: str = 'bfloat16'

  def __post_init__(self):
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    object.__setattr__(self, 'targets', targets)
    if not (isinstance(self.rank, int) and self.rank > 0):
      raise ValueError(f'LoraConfig.rank is {self.rank!r}; it must be an integer > 0')
    if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f'LoraConfig.alpha is {self.alpha!r}; it must be a number > 0')
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
      raise ValueError(
        f'LoraConfig.targets {list(targets)}: unknown target '
        f'{unknown[0] if unknown else "(none given)"!r}; use some of {TARGETS}'
      )
    if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
      raise ValueError(f'LoraConfig.dropout is {self.dropout!r}; it must lie in [0, 1)')
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f'LoraConfig.base_dtype {self.base_dtype!r} is not one of {BASE_DTYPES}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def sites(self) -> tuple[tuple[str, str, str], ...]:
    return tuple(s for t in self.targets for s in SITES[t])


class LoraParam(nnx.Variable):
  """A trainable adapter matrix (A or B)."""


def _pick(shape, roles, which) -> tuple[int, ...]:
  return tuple(i for i, r in enumerate(roles) if r in which)


def adapter_shapes(shape, axes, roles, rank):
  """(A shape, A axes, B shape, B axes) for a weight of `shape`/`axes` with dim `roles`."""
  b, i, o = (_pick(shape, roles, r) for r in 'bio')
  take = lambda idx, xs: tuple(xs[k] for k in idx)
  return (
    take(b + i, shape) + (rank,),
    take(b + i, axes) + (RANK,),
    take(b, shape) + (rank,) + take(o, shape),
    take(b, axes) + (RANK,) + take(o, axes),
  )


def attach(model: nnx.Module, lora: LoraConfig, rngs: nnx.Rngs) -> None:
  """Adds `{w}_lora_a` / `{w}_lora_b` LoraParams beside each target weight of `model`
  (an FLMAudio), and alpha / rank as its modules' `lora_scale` (read by `wrap`)."""
  for module in ('backbone', 'depth_transformer'):
    getattr(model, module).lora_scale = lora.scale
  for module, name, roles in lora.sites():
    owner = getattr(model, module)
    w = getattr(owner, name)
    a_shape, a_axes, b_shape, b_axes = adapter_shapes(
      w.shape, w.get_metadata()['axes'], roles, lora.rank
    )
    fan_in = math.prod(w.shape[k] for k in _pick(w.shape, roles, 'i'))
    a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / math.sqrt(fan_in)
    a = a * real_mask(a_shape, a_axes, model.cfg)
    setattr(owner, f'{name}_lora_a', LoraParam(a, axes=a_axes))
    setattr(owner, f'{name}_lora_b', LoraParam(jnp.zeros(b_shape, jnp.float32), axes=b_axes))


def real_mask(shape, axes, cfg) -> jax.Array:
  """1 over the real extent, 0 over the layout padding of the vocab and the depth MLP (see
  ModelConfig.tensor_parallel). Adapters start zero there, so, like the padded base weights,
  they get zero gradients and stay zero: padded units and logits remain inert."""
  real = {'vocab': cfg.vocab_size, 'depth_mlp': cfg.depth_mlp_dim}
  mask = jnp.ones(shape, jnp.float32)
  for k, (size, axis) in enumerate(zip(shape, axes)):
    if axis in real and real[axis] < size:
      keep = jnp.arange(size) < real[axis]
      mask = mask * keep.reshape([-1 if j == k else 1 for j in range(len(shape))])
  return mask


def delta(a: jax.Array, b: jax.Array, roles: str, scale: float) -> jax.Array:
  """A @ B * scale in the layout of the weight whose dims have `roles` (for merging)."""
  letters = 'abcdefghijklmnopq'[: len(roles)]
  pick = lambda which: ''.join(c for c, r in zip(letters, roles) if r in which)
  return (
    jnp.einsum(
      f'{pick("b")}{pick("i")}z,{pick("b")}z{pick("o")}->{letters}',
      a.astype(jnp.float32),
      b.astype(jnp.float32),
    )
    * scale
  )


LAYOUT_FIELDS = ('dtype', 'param_dtype', 'checkpoint_dtype', 'tensor_parallel')


def fingerprint(cfg, base_dtype: str, base) -> str:
  """sha256 of the base's architecture (ModelConfig `cfg` less its layout fields) and dtype
  and, per tensor, its path, dtype and an exact checksum (the bits summed as uint32 mod 2^32:
  independent of the mesh, its padding zeros and the reduction order)."""
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LAYOUT_FIELDS}
  flat = jax.tree_util.tree_flatten_with_path(base)[0]
  sums = jax.device_get(_checksums([x for _, x in flat]))
  tensors = [
    [jax.tree_util.keystr(path), str(np.dtype(x.dtype)), int(s)] for (path, x), s in zip(flat, sums)
  ]
  text = json.dumps(
    {'config': fields, 'base_dtype': base_dtype, 'tensors': tensors}, sort_keys=True, default=str
  )
  return hashlib.sha256(text.encode()).hexdigest()


@jax.jit
def _checksums(xs: list[jax.Array]) -> list[jax.Array]:
  """One uint32 per array: its bits summed mod 2^32 (one compiled program for the whole base)."""

  def one(x):
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jnp.sum(jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32), dtype=jnp.uint32)

  return [one(x) for x in xs]


SUFFIXES = ('_lora_a', '_lora_b')
# A dropout sub-stream per weight name (the same name in two modules runs under two streams).
_SITE_IDS = {n: i for i, n in enumerate(sorted({w for s in SITES.values() for _, w, _ in s}))}


def wrap(tree: dict, scale: float) -> dict:
  """One module's arrays by name (weights, adapters beside them) -> {name: weight}: each weight
  that has adapters as a LoraWeight(W, A, B, scale); the rest as they are."""
  out = {k: v for k, v in tree.items() if not k.endswith(SUFFIXES)}
  for name in out:
    if f'{name}_lora_a' in tree:
      a, b = tree[f'{name}_lora_a'], tree[f'{name}_lora_b']
      out[name] = LoraWeight(out[name], a, b, scale, _SITE_IDS[name])
  return out


def split_params(params: dict) -> tuple[dict, dict]:
  """A LoRA model's pure dict -> (base: weights and int8 scales, adapters)."""
  base, adapters = {}, {}
  for module, tree in params.items():
    base[module] = {k: v for k, v in tree.items() if not k.endswith(SUFFIXES)}
    adapters[module] = {k: v for k, v in tree.items() if k.endswith(SUFFIXES)}
  return base, adapters

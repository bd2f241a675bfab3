"""LoRA adapters and the int8 frozen base, applied inside the model's own (scanned) layers.

A weight W that has an adapter is read as `x @ W + (x @ A) @ B * alpha / rank` (`dense`), with
A [in, r] drawn normal / sqrt(in) and B [r, out] zeros, both float32, so B = 0 is the base
exactly. Adapters are `LoraParam` variables beside their weight (`q` -> `q_lora_a`,
`q_lora_b`), stacked like it over layers and codebooks and named by the same logical axes, so
FSDP and tensor rules shard them like their base. An int8 base keeps each quantized weight
as int8 with a per-output-channel float32 `QuantScale` (`q` -> `q_scale`, symmetric,
absmax / 127 over the input dims); `dense` dequantizes the one layer slice it reads, so no
bf16 copy of the base exists.

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

from flmjax import sharding as shd

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
# The int8 base quantizes the scanned layers' matrices (85% of flm_8b's weights); embeddings,
# heads, norms and biases stay in bfloat16.
QUANTIZED = SITES['attn'] + SITES['mlp'] + SITES['depth'][1:]


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


class QuantScale(nnx.Variable):
  """The per-output-channel scale of an int8 base weight (frozen, like the base)."""


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
  (an FLMAudio), and `{w}_scale` QuantScales (ones, until `quantize`) for an int8 base."""
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
  if lora.base_dtype == 'int8':
    for module, name, roles in QUANTIZED:
      owner = getattr(model, module)
      w = getattr(owner, name)
      shape = tuple(1 if r == 'i' else s for s, r in zip(w.shape, roles))
      axes = tuple(None if r == 'i' else a for a, r in zip(w.get_metadata()['axes'], roles))
      setattr(owner, f'{name}_scale', QuantScale(jnp.ones(shape, jnp.float32), axes=axes))


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


def siblings(module: nnx.Module, name: str) -> dict[str, jax.Array]:
  """The adapter and scale arrays of weight `name` that `module` has, as is (float32)."""
  return {
    f'{name}{s}': getattr(module, f'{name}{s}')[...]
    for s in ('_lora_a', '_lora_b', '_scale')
    if hasattr(module, f'{name}{s}')
  }


def weight(p: dict, name: str, dtype) -> jax.Array:
  """p[name] in `dtype`, dequantized with p[name + '_scale'] when the base is int8."""
  w = p[name]
  if f'{name}_scale' in p:
    return w.astype(dtype) * p[f'{name}_scale'].astype(dtype)
  return w.astype(dtype)


Dropout = tuple  # (key, rate): LoRA dropout on the adapters' input, in training only


def fold(dropout: Dropout | None, data) -> Dropout | None:
  """A sub-stream of `dropout` for one module, layer, block or codebook (`data`, an int)."""
  return None if dropout is None else (jax.random.fold_in(dropout[0], data), dropout[1])


# A dropout sub-stream per weight name (the same name in two modules runs under two streams).
_SITE_IDS = {n: i for i, n in enumerate(sorted({w for s in SITES.values() for _, w, _ in s}))}


def dense(
  spec: str,
  x: jax.Array,
  p: dict,
  name: str,
  scale: float,
  take=None,
  dropout: Dropout | None = None,
) -> jax.Array:
  """einsum(spec, x, W) + einsum((x A), B) * scale for p's weight `name` (one layer slice) and
  its adapters, if any; `take` maps each of W, A, B and the int8 scale first (e.g. a slice of
  the codebooks). The low-rank einsums come from `spec`: letters shared by x, W and the output
  are batched, those of x and W only are contracted, those of W only are outputs. `dropout`
  (key, rate) drops the adapters' input as PEFT's lora_dropout does; the base path sees x."""
  take = take or (lambda w: w)
  q = {k: take(v) for k, v in p.items() if k == name or k.startswith(f'{name}_')}
  y = jnp.einsum(spec, x, weight(q, name, x.dtype))
  if f'{name}_lora_a' not in q:
    return y
  if dropout is not None:
    key, rate = fold(dropout, _SITE_IDS[name])
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
  lhs, out = spec.split('->')
  xs, ws = lhs.split(',')
  ell = '...' if xs.startswith('...') else ''
  xs, out = xs.removeprefix('...'), out.removeprefix('...')
  batch = ''.join(c for c in ws if c in xs and c in out)
  ins = ''.join(c for c in ws if c in xs and c not in out)
  outs = ''.join(c for c in ws if c not in xs)
  mid = ''.join(c for c in xs if c not in ins) + 'r'
  xa = jnp.einsum(f'{ell}{xs},{batch}{ins}r->{ell}{mid}', x, q[f'{name}_lora_a'].astype(x.dtype))
  delta = jnp.einsum(
    f'{ell}{mid},{batch}r{outs}->{ell}{out}', xa, q[f'{name}_lora_b'].astype(x.dtype)
  )
  return y + delta * jnp.asarray(scale, x.dtype)


def rows(module: nnx.Module, name: str, index: tuple, dtype, axes) -> jax.Array:
  """Embedding rows W[index] (+ A[index] @ B * scale with an `embed` adapter) -> [..., d]:
  index is (ids,) or (codebooks, ids) for a table stacked over codebooks. The tables are pinned
  to `axes` first unless None (FSDP: the embed dim gathered, so lookups stay local to each batch
  shard)."""
  pin = (lambda x: x) if axes is None else (lambda x: shd.constrain(x, axes))
  table = lambda n: pin(getattr(module, n)[...].astype(dtype))
  out = table(name)[index]
  if not hasattr(module, f'{name}_lora_a'):
    return out
  a = table(f'{name}_lora_a')[index]  # [..., r]
  b = getattr(module, f'{name}_lora_b')[...].astype(dtype)  # [r, d] or [C, r, d]
  spec = '...r,rd->...d' if b.ndim == 2 else '...Cr,Crd->...Cd'
  return out + jnp.einsum(spec, a, b) * jnp.asarray(module.lora_scale, dtype)


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


def quantize(w: jax.Array, roles: str) -> tuple[jax.Array, jax.Array]:
  """w -> (int8 values, float32 scale): symmetric per output channel over the input dims."""
  ins = _pick(w.shape, roles, 'i')
  scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=ins, keepdims=True) / 127.0
  # Zero columns (layout padding) get scale 0: they stay zero, and the base's fingerprint does
  # not depend on how much padding the mesh asks for.
  q = jnp.round(w.astype(jnp.float32) / jnp.where(scale > 0, scale, 1.0))
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


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


ADAPTER_SUFFIXES = ('_lora_a', '_lora_b', '_scale')


def split_params(params: dict) -> tuple[dict, dict]:
  """A LoRA model's pure dict -> (base: weights and int8 scales, adapters)."""
  base, adapters = {}, {}
  for module, tree in params.items():
    base[module] = {k: v for k, v in tree.items() if not k.endswith(('_lora_a', '_lora_b'))}
    adapters[module] = {k: v for k, v in tree.items() if k.endswith(('_lora_a', '_lora_b'))}
  return base, adapters


def merged_params(params: dict, lora: LoraConfig) -> dict:
  """A LoRA model's pure dict (base + adapters, int8 or not) -> the plain model's, float32:
  int8 weights dequantized, W + A @ B * alpha / rank folded in (what `dense` computes)."""
  out = {
    m: {k: v for k, v in tree.items() if not k.endswith(ADAPTER_SUFFIXES)}
    for m, tree in params.items()
  }
  for module, name, _ in QUANTIZED:
    if f'{name}_scale' in params[module]:
      out[module][name] = weight(params[module], name, jnp.float32)
  for module, name, roles in lora.sites():
    tree = params[module]
    out[module][name] = out[module][name].astype(jnp.float32) + delta(
      tree[f'{name}_lora_a'], tree[f'{name}_lora_b'], roles, lora.scale
    )
  return jax.tree.map(lambda x: x.astype(jnp.float32), out)


def quantize_base(base: dict) -> dict:
  """A base pure dict (weights, no adapters) -> the int8 base: QUANTIZED weights as int8 with
  their `_scale` beside them; everything else in bfloat16."""
  out = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  for module, name, roles in QUANTIZED:
    out[module][name], out[module][f'{name}_scale'] = quantize(base[module][name], roles)
  return out


def cast_base(base: dict, base_dtype: str) -> dict:
  """The frozen base as it is stored in training: int8 (quantize_base), or cast."""
  if base_dtype == 'int8':
    return quantize_base(base)
  return jax.tree.map(lambda x: x.astype(base_dtype), base)

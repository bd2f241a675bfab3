"""The int8 frozen base of LoRA, as a transform of the params: `quantize_base` turns a base's
scanned-layer matrices into int8 values with a per-output-channel float32 scale (symmetric,
absmax / 127 over the input dims), stored beside the weight (`q` -> `q` int8, `q_scale`);
`wrap` reads such a pair as one Int8Weight, which flmjax.model.weights.dense dequantizes a
layer slice at a time, so no bf16 copy of the base exists."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flmjax.model.lora import SITES
from flmjax.model.weights import Int8Weight

# The int8 base quantizes the scanned layers' matrices (85% of flm_8b's weights); embeddings,
# heads, norms and biases stay in bfloat16.
QUANTIZED = SITES['attn'] + SITES['mlp'] + SITES['depth'][1:]
SUFFIX = '_scale'


class QuantScale(nnx.Variable):
  """The per-output-channel scale of an int8 base weight (frozen, like the base)."""


def _ins(roles: str) -> tuple[int, ...]:
  return tuple(k for k, r in enumerate(roles) if r == 'i')


def quantize(w: jax.Array, roles: str) -> tuple[jax.Array, jax.Array]:
  """w -> (int8 values, float32 scale): symmetric per output channel over the input dims."""
  scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=_ins(roles), keepdims=True) / 127.0
  # Zero columns (layout padding) get scale 0: they stay zero, and the base's fingerprint does
  # not depend on how much padding the mesh asks for.
  q = jnp.round(w.astype(jnp.float32) / jnp.where(scale > 0, scale, 1.0))
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def attach_scales(model: nnx.Module) -> None:
  """Adds a `{w}_scale` QuantScale (ones, until quantize_base fills it) beside each QUANTIZED
  weight of `model` (an FLMAudio), so its state has the int8 base's tree."""
  for module, name, roles in QUANTIZED:
    owner = getattr(model, module)
    w = getattr(owner, name)
    shape = tuple(1 if r == 'i' else s for s, r in zip(w.shape, roles))
    axes = tuple(None if r == 'i' else a for a, r in zip(w.get_metadata()['axes'], roles))
    setattr(owner, f'{name}{SUFFIX}', QuantScale(jnp.ones(shape, jnp.float32), axes=axes))


def quantize_base(base: dict) -> dict:
  """A base pure dict (weights, no adapters) -> the int8 base: QUANTIZED weights as int8 with
  their `_scale` beside them; everything else in bfloat16."""
  out = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  for module, name, roles in QUANTIZED:
    out[module][name], out[module][f'{name}{SUFFIX}'] = quantize(base[module][name], roles)
  return out


def cast_base(base: dict, base_dtype: str) -> dict:
  """The frozen base as it is stored in training: int8 (quantize_base), or cast."""
  if base_dtype == 'int8':
    return quantize_base(base)
  return jax.tree.map(lambda x: x.astype(base_dtype), base)


def wrap(tree: dict) -> dict:
  """One module's arrays by name -> the same with each int8 weight and its scale as one
  Int8Weight under the weight's name."""
  out = {k: v for k, v in tree.items() if not (k.endswith(SUFFIX) and k[: -len(SUFFIX)] in tree)}
  for name in out:
    if f'{name}{SUFFIX}' in tree:
      out[name] = Int8Weight(tree[name], tree[f'{name}{SUFFIX}'])
  return out

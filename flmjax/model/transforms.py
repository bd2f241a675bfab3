"""Transforms of a model's weights, on its pure dict of params: LoRA's frozen base built and cast
(bfloat16, float32 or int8: flmjax.model.lora.cast_base), the base joined with the adapters,
and a LoRA model merged into a plain one. They sit above flm.py and lora.py, which do not
import each other's callers."""

from __future__ import annotations

from flax import nnx

from flmjax.model import lora as lora_lib
from flmjax.model.flm import abstract, create

Params = dict  # nested {'backbone': {...}, 'depth_transformer': {...}} of arrays


def join(base: Params | None, params: Params) -> Params:
  """The model's whole pure dict: the frozen base (LoRA) with the trained params beside it."""
  if base is None:
    return params
  return {m: {**base[m], **params[m]} for m in base}


def build_base(cfg, seed: int, base_dtype: str, weights: Params | None = None) -> Params:
  """LoRA's frozen base: `weights` (an official checkpoint's, without adapters) or the seed's
  initialisation, cast to `base_dtype`. Callers jit it (training and restore alike): eager ops
  may round the initialisation and the int8 scales differently in the last bit."""
  if weights is None:
    weights = nnx.to_pure_dict(nnx.state(create(cfg, seed)))
  return lora_lib.cast_base(weights, base_dtype)


def merge(model: nnx.Module) -> nnx.Module:
  """A LoRA FLMAudio -> a plain FLMAudio (float32 params) with the adapters merged in."""
  params = nnx.to_pure_dict(nnx.state(model))
  cfg = model.cfg.replace(param_dtype='float32')
  graphdef, _ = nnx.split(abstract(cfg))
  return nnx.merge(graphdef, lora_lib.merged_params(params, model.lora))

"""What `flmjax aot` is asked to compile: the request, read from a training config or a preset
and the command's flags, with every bad value a one-line AotError. Nothing here touches libtpu."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.errors import FlmjaxError
from flmjax.model.lora import LoraConfig


class AotError(FlmjaxError, ValueError):
  """A compile request is malformed, or libtpu is missing."""


@dataclasses.dataclass(frozen=True)
class AotRequest:
  """What to compile. For step='decode', `window` is the KV-cache positions per session
  (`flmjax aot --max-len`) and `batch` the sessions."""

  topology: str  # e.g. 'v5p:4x4x4'
  model: ModelConfig
  step: str = 'train'  # 'train' | 'decode'
  window: int = 4096
  batch: int = 64
  fsdp: int = 1
  tensor: int = 1
  remat: str = 'full'
  grad_accum: int = 1
  compute_dtype: str = 'bfloat16'
  pallas: bool = False  # decode: the Mosaic depth kernel in shard_map, as use_pallas=True runs
  lora: LoraConfig | None = None  # train: LoRA adapters on a frozen base (int8 or bf16)
  kv_pages: int | None = None  # decode: a paged KV cache of this many pages (None: contiguous)
  page_size: int = 128
  kv_dtype: str = 'bf16'  # decode, paged: 'bf16' (the compute dtype) or 'int8'

  @property
  def chip(self) -> str:
    return self.topology.split(':')[0]


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=16,tensor=4' -> {'fsdp': 16, 'tensor': 4}; data takes the remaining devices."""
  try:
    return shd.parse_axes(text, axes=('fsdp', 'tensor'), example='fsdp=16,tensor=4')
  except ValueError as e:
    raise AotError(f'{e} (data takes the remaining devices)') from None


def make_request(
  topology: str,
  num_chips: int,
  *,
  step: str = 'train',
  config: str | None = None,
  preset: str | None = None,
  window: int | None = None,
  batch: int | None = None,
  mesh: str | None = None,
  remat: str | None = None,
  grad_accum: int | None = None,
  pallas: bool = False,
  lora_rank: int | None = None,
  lora_targets: str | None = None,
  base_dtype: str | None = None,
  kv_pages: int | None = None,
  page_size: int | None = None,
  kv_dtype: str | None = None,
  overrides: Sequence[str] = (),
) -> AotRequest:
  """What `flmjax aot` compiles: a training config's model, window, batch, mesh, remat, dtype
  and LoRA (loading it has no side effects), else the preset (default flm_8b); set arguments
  override. lora_rank R (alpha R) trains LoRA adapters on `lora_targets` (comma-separated,
  default attn,mlp) over a frozen `base_dtype` base (default bfloat16). `overrides` (KEY=VALUE,
  flmjax.train.overrides) apply to the config before anything is read from it."""
  from flmjax.train.overrides import load_config

  base = dict(
    model=None,
    window=None,
    batch=64,
    remat='full',
    grad_accum=1,
    compute_dtype='bfloat16',
    fsdp=None,
    tensor=1,
    lora=None,
  )
  if overrides and not config:
    raise AotError('overrides apply to a training config: give config=... too')
  if config:
    # the run dir is never written
    tc = load_config(config, os.path.join('runs', 'aot'), overrides)
    base.update(
      model=tc.model,
      window=tc.window,
      batch=tc.batch_size,
      remat=tc.remat,
      grad_accum=tc.grad_accum,
      compute_dtype=tc.compute_dtype,
      fsdp=tc.mesh.fsdp,
      tensor=tc.mesh.tensor,
      lora=tc.lora,
    )
  base['lora'] = _lora_request(base['lora'], lora_rank, lora_targets, base_dtype)
  if preset or base['model'] is None:
    base['model'] = getattr(ModelConfig, preset or 'flm_8b')()
  axes = parse_mesh(mesh) if mesh else {}
  base.update(
    {
      k: v
      for k, v in (
        ('window', window),
        ('batch', batch),
        ('remat', remat),
        ('grad_accum', grad_accum),
      )
      if v is not None
    },
    **axes,
  )
  if mesh and 'fsdp' not in axes:
    base['fsdp'] = 1
  if base['fsdp'] is None:
    base['fsdp'] = num_chips // base['tensor']
  if base['window'] is None:
    base['window'] = 4096 if step == 'train' else base['model'].max_position_embeddings
  if pallas and step != 'decode':
    raise AotError('`pallas`: the Pallas depth kernel is compiled with `step` decode only')
  if (kv_pages or page_size or kv_dtype) and step != 'decode':
    raise AotError('`kv_pages`/`page_size`/`kv_dtype`: a paged KV cache is for `step` decode')
  if (page_size or kv_dtype) and not kv_pages:
    raise AotError('`page_size`/`kv_dtype` need `kv_pages` N (the paged cache)')
  paged = {}
  if kv_pages:
    paged = dict(kv_pages=kv_pages, page_size=page_size or 128, kv_dtype=kv_dtype or 'bf16')
    if base['window'] % paged['page_size']:
      raise AotError(
        f'`window` {base["window"]} is not a multiple of `page_size` {paged["page_size"]}'
      )
  return AotRequest(topology=topology, step=step, pallas=pallas, **base, **paged)


def _lora_request(lora, rank, targets, base_dtype):
  if rank is None and lora is None:
    if targets or base_dtype:
      raise AotError(
        f'{"`lora_targets`" if targets else "`base_dtype`"} needs `lora_rank` R '
        '(the base is only frozen, or quantized, under LoRA)'
      )
    return None
  kw = {} if lora is None else dataclasses.asdict(lora)
  if rank is not None:
    kw.update(rank=rank, alpha=float(rank))
  if targets:
    kw['targets'] = tuple(t.strip() for t in targets.split(',') if t.strip())
  if base_dtype:
    kw['base_dtype'] = base_dtype
  try:
    return LoraConfig(**kw)
  except ValueError as e:
    raise AotError(f'LoRA: {e}') from None

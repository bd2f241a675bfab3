"""Mimi's official checkpoint layout (golden/mimi/manifest.json) <-> the JAX parameter tree.

Torch layouts become NWC-friendly ones: conv [O,I,K] -> [K,I,O], transposed conv [I,O,K] ->
[I,K,O], linear [out,in] -> [in,out], in_proj [3D,D] -> [D,3,N,H]. A codebook is stored as its
centroids, `embedding_sum / clamp(cluster_usage, 1e-5)`. Every parameter carries logical axis
names (`param_axes`), mapped to mesh axes by flmjax.sharding.RULES.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from einops import rearrange

from flmjax.checkpoint import kinds, safetensors_io
from flmjax.codec import seanet
from flmjax.codec.mimi_config import MimiConfig
from flmjax.errors import FlmjaxError


class MimiCheckpointError(FlmjaxError, ValueError):
  """A Mimi checkpoint is missing, truncated, or does not match the config's layout."""


def _seanet_keys(cfg: MimiConfig, decoder: bool) -> dict[str, str]:
  """conv name -> official module prefix,
  e.g. 'blocks.0.res.0.conv1' -> 'encoder.model.1.block.1'."""
  side, per = ('decoder' if decoder else 'encoder'), cfg.n_residual_layers + 2
  last = 2 + len(cfg.ratios) * per  # after the final ELU
  out = {'conv_in': f'{side}.model.0.conv.conv', 'conv_out': f'{side}.model.{last}.conv.conv'}
  for i in range(len(cfg.ratios)):
    base = 1 + i * per  # encoder: res..., ELU, down; decoder: ELU, up, res...
    res0 = base + 2 if decoder else base
    for j in range(cfg.n_residual_layers):
      out[f'blocks.{i}.res.{j}.conv1'] = f'{side}.model.{res0 + j}.block.1.conv.conv'
      out[f'blocks.{i}.res.{j}.conv2'] = f'{side}.model.{res0 + j}.block.3.conv.conv'
    if decoder:
      out[f'blocks.{i}.up'] = f'{side}.model.{base + 1}.convtr.convtr'
    else:
      out[f'blocks.{i}.down'] = f'{side}.model.{base + cfg.n_residual_layers + 1}.conv.conv'
  return out


def _codebook_prefixes(cfg: MimiConfig, count: int) -> list[str]:
  return ['quantizer.rvq_first.vq.layers.0._codebook'] + [
    f'quantizer.rvq_rest.vq.layers.{i}._codebook' for i in range(count - 1)
  ]


def checkpoint_layout(cfg: MimiConfig) -> dict[str, tuple[int, ...]]:
  """Every key of the official state dict with its shape (all `total_codebooks` codebooks)."""
  shapes: dict[str, tuple[int, ...]] = {}
  for decoder, convs in ((False, seanet.encoder_convs(cfg)), (True, seanet.decoder_convs(cfg))):
    prefix = _seanet_keys(cfg, decoder)
    for name, cin, cout, k, _, _ in convs:
      up = name.endswith('.up')
      shapes[f'{prefix[name]}.weight'] = (cin, cout, k) if up else (cout, cin, k)
      shapes[f'{prefix[name]}.bias'] = (cout,)
  D, F = cfg.dimension, cfg.dim_feedforward
  for side in ('encoder_transformer', 'decoder_transformer'):
    for l in range(cfg.num_layers):
      p = f'{side}.transformer.layers.{l}'
      shapes.update(
        {
          f'{p}.self_attn.in_proj_weight': (3 * D, D),
          f'{p}.self_attn.out_proj.weight': (D, D),
          f'{p}.norm1.weight': (D,),
          f'{p}.norm1.bias': (D,),
          f'{p}.norm2.weight': (D,),
          f'{p}.norm2.bias': (D,),
          f'{p}.linear1.weight': (F, D),
          f'{p}.linear2.weight': (D, F),
          f'{p}.layer_scale_1.scale': (D,),
          f'{p}.layer_scale_2.scale': (D,),
        }
      )
  Q, V = cfg.quantizer_dimension, cfg.quantizer_bins
  for group in ('rvq_first', 'rvq_rest'):
    shapes[f'quantizer.{group}.input_proj.weight'] = (Q, D, 1)
    shapes[f'quantizer.{group}.output_proj.weight'] = (D, Q, 1)
  for p in _codebook_prefixes(cfg, cfg.total_codebooks):
    shapes.update(
      {f'{p}._initialized': (1,), f'{p}.cluster_usage': (V,), f'{p}.embedding_sum': (V, Q)}
    )
  shapes['downsample.conv.conv.conv.weight'] = (D, D, 2 * cfg.resample_stride)
  shapes['upsample.convtr.convtr.convtr.weight'] = (D, 1, 2 * cfg.resample_stride)
  return shapes


def params_from_state_dict(cfg: MimiConfig, get: Callable[[str], np.ndarray]):
  """Builds (params, axes) trees from `get(key)` (float32 numpy in the official layout)."""

  def seanet_params(decoder: bool):
    keys, tree, tree_axes = _seanet_keys(cfg, decoder), {}, {}
    for name, *_ in (seanet.decoder_convs if decoder else seanet.encoder_convs)(cfg):
      w = get(f'{keys[name]}.weight')
      if name.endswith('.up'):  # [I,O,2S] -> [2,I,S*O]: taps for x[t-1] (k = S+s), x[t] (k = s)
        cin, cout, k = w.shape
        w = rearrange(w, 'I O (two S) -> two I (S O)', two=2)[::-1]
        p = {'w': w, 'b': get(f'{keys[name]}.bias')}
        a = {'w': ('conv_kernel', 'conv_in', 'conv_out'), 'b': ('conv_out',)}
      else:
        p = {'w': w.transpose(2, 1, 0), 'b': get(f'{keys[name]}.bias')}  # [K,I,O]
        a = {'w': ('conv_kernel', 'conv_in', 'conv_out'), 'b': ('conv_out',)}
      _set(tree, name, {k: np.asarray(v, np.float32) for k, v in p.items()})
      _set(tree_axes, name, a)
    return tree, tree_axes

  def transformer_params(side: str):
    N, H, D = cfg.num_heads, cfg.head_dim, cfg.dimension
    layers, layer_axes = [], []
    for l in range(cfg.num_layers):
      p = f'{side}.transformer.layers.{l}'
      norm = lambda n, p=p: {'scale': get(f'{p}.{n}.weight'), 'bias': get(f'{p}.{n}.bias')}
      layers.append(
        {
          'norm1': norm('norm1'),
          'norm2': norm('norm2'),
          # torch's [out, in] layout: the transformer computes W @ X^T (mimi_transformer.linear_t)
          'qkv': get(f'{p}.self_attn.in_proj_weight').reshape(3, N, H, D),
          'out': get(f'{p}.self_attn.out_proj.weight').reshape(D, N, H),
          'linear1': get(f'{p}.linear1.weight'),
          'linear2': get(f'{p}.linear2.weight'),
          'layer_scale_1': get(f'{p}.layer_scale_1.scale'),
          'layer_scale_2': get(f'{p}.layer_scale_2.scale'),
        }
      )
      norm_axes = {'scale': ('norm',), 'bias': ('norm',)}
      layer_axes.append(
        {
          'norm1': norm_axes,
          'norm2': norm_axes,
          'qkv': ('qkv', 'q_heads', 'head_dim', 'embed'),
          'out': ('embed', 'q_heads', 'head_dim'),
          'linear1': ('mlp', 'embed'),
          'linear2': ('embed', 'mlp'),
          'layer_scale_1': ('norm',),
          'layer_scale_2': ('norm',),
        }
      )
    return {'layers': layers}, {'layers': layer_axes}

  def codebook(prefix):
    usage = np.maximum(get(f'{prefix}.cluster_usage'), 1e-5)
    return get(f'{prefix}.embedding_sum') / usage[:, None]

  params, axes = {}, {}
  params['encoder'], axes['encoder'] = seanet_params(False)
  params['decoder'], axes['decoder'] = seanet_params(True)
  for side in ('encoder_transformer', 'decoder_transformer'):
    params[side], axes[side] = transformer_params(side)
  proj = lambda g, which: get(f'quantizer.{g}.{which}_proj.weight')[:, :, 0].T
  params['quantizer'] = {
    'first_in': proj('rvq_first', 'input'),
    'first_out': proj('rvq_first', 'output'),
    'rest_in': proj('rvq_rest', 'input'),
    'rest_out': proj('rvq_rest', 'output'),
    'codebooks': [codebook(p) for p in _codebook_prefixes(cfg, cfg.num_codebooks)],
  }
  # One array per codebook (a slice of a stacked [K,V,Q] is copied before every matmul on CPU),
  # with its squared norms precomputed for the nearest-neighbour search.
  quantizer = params['quantizer']
  quantizer['norms'] = [np.sum(np.square(c), -1) for c in quantizer['codebooks']]
  axes['quantizer'] = {
    'first_in': ('embed', 'codebook_dim'),
    'first_out': ('codebook_dim', 'embed'),
    'rest_in': ('embed', 'codebook_dim'),
    'rest_out': ('codebook_dim', 'embed'),
    'codebooks': [('codebook_entries', 'codebook_dim')] * cfg.num_codebooks,
    'norms': [('codebook_entries',)] * cfg.num_codebooks,
  }
  down = get('downsample.conv.conv.conv.weight')
  params['downsample'] = {'w': down.transpose(2, 1, 0)}  # [K,I,O]
  axes['downsample'] = {'w': ('conv_kernel', 'conv_in', 'conv_out')}
  params['upsample'] = {'w': get('upsample.convtr.convtr.convtr.weight')[:, 0, :].T}  # [K,C]
  axes['upsample'] = {'w': ('conv_kernel', 'channel')}
  params = jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), params)
  return params, axes


def _set(tree: dict, name: str, value):
  """tree['blocks'][0]['res'][0]['conv1'] = value for name 'blocks.0.res.0.conv1'."""
  parts = name.split('.')
  for part, nxt in zip(parts[:-1], parts[1:]):
    if isinstance(tree, list):
      part = int(part)
      while len(tree) <= part:
        tree.append([] if nxt.isdigit() else {})
      tree = tree[part]
    else:
      tree = tree.setdefault(part, [] if nxt.isdigit() else {})
  tree[parts[-1]] = value


def random_state_dict(cfg: MimiConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights in the official layout: fan-in scaled normals, codebooks ~ N(0,1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in checkpoint_layout(cfg).items():
    if key.endswith('cluster_usage') or key.endswith('_initialized'):
      value = np.ones(shape, np.float32)
    elif key.endswith('embedding_sum'):
      value = rng.standard_normal(shape, np.float32)
    elif key.endswith('.scale'):
      value = np.full(shape, cfg.layer_scale, np.float32)
    elif key.endswith('norm1.weight') or key.endswith('norm2.weight'):
      value = np.ones(shape, np.float32)
    elif len(shape) == 1:
      value = np.zeros(shape, np.float32)
    else:
      fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1)
      if 'convtr' in key:
        fan_in = shape[0] * shape[2] // 2
      value = rng.standard_normal(shape, np.float32) / np.sqrt(max(fan_in, 1))
    out[key] = value
  return out


def find_files(path_or_dir: str) -> tuple[str, str | None]:
  """-> (safetensors file, config.json next to it or None)."""
  path = os.fspath(path_or_dir)
  if os.path.isdir(path):
    found = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
    if len(found) != 1:
      raise MimiCheckpointError(
        f'{path}: expected exactly one .safetensors Mimi checkpoint, found {found or "none"}'
      )
    path = os.path.join(path, found[0])
  if not os.path.isfile(path):
    raise MimiCheckpointError(f'{path}: no such Mimi checkpoint file')
  config = os.path.join(os.path.dirname(path), 'config.json')
  return path, (config if os.path.isfile(config) else None)


def read_checkpoint(path_or_dir: str, num_codebooks: int = 8):
  """-> (MimiConfig, params, axes). Named errors for a truncated file, wrong keys or shapes."""
  if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or num_codebooks < 1:
    raise ValueError(f'load_mimi: num_codebooks={num_codebooks!r} must be an integer >= 1')
  problem = kinds.misplaced(path_or_dir, (kinds.MIMI,))
  if problem:
    raise MimiCheckpointError(problem)
  path, config_path = find_files(path_or_dir)
  if config_path is None:
    cfg = MimiConfig.full()
  else:
    try:
      with open(config_path) as f:
        cfg = MimiConfig.from_kwargs(json.load(f))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
      raise MimiCheckpointError(f'{config_path}: not a Mimi config ({e})') from None
  if num_codebooks > cfg.total_codebooks:
    raise ValueError(
      f'load_mimi: num_codebooks={num_codebooks} is more than the '
      f'{cfg.total_codebooks} codebooks of {path}; pass 1..{cfg.total_codebooks}'
    )
  cfg = dataclasses.replace(cfg, num_codebooks=num_codebooks)
  try:
    header = safetensors_io.read_header(path)
  except safetensors_io.CorruptCheckpointError as e:
    raise MimiCheckpointError(str(e)) from None
  layout = checkpoint_layout(cfg)
  where = (
    config_path
    if config_path
    else 'the full config (no config.json next to it; a reduced Mimi needs its kwargs there)'
  )
  missing = sorted(set(layout) - set(header))
  unexpected = sorted(set(header) - set(layout))
  if missing or unexpected:
    raise MimiCheckpointError(
      f'{path}: does not match the Mimi layout of {where}: {len(missing)} missing key(s) '
      f'{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}'
    )
  for key, shape in layout.items():
    if header[key].shape != shape:
      raise MimiCheckpointError(
        f'{path}: tensor {key!r} has shape {header[key].shape}, expected {shape} ({where})'
      )
  get = lambda key: np.asarray(safetensors_io.read_tensor(header[key]), np.float32)
  params, axes = params_from_state_dict(cfg, get)
  return cfg, params, axes

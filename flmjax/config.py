"""ModelConfig: the one source of truth for shapes, token ids and delays.

Reads and writes the official FLM-Audio `config.json` (docs/architecture.md §1-3, §6).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from flmjax.errors import FlmjaxError


class ConfigError(FlmjaxError, ValueError):
  """A config.json field is unknown, missing or inconsistent."""


def stream_delays(num_codebooks: int, acoustic_delay: int = 1) -> tuple[int, ...]:
  """Per-channel delays [text, speak 0..C-1, listen 0..C-1] on the delayed grid.

  Semantic codebooks (index 0) sit at delay 0; acoustic ones lag by `acoustic_delay`.
  """
  speech = (0,) + (acoustic_delay,) * (num_codebooks - 1)
  return (0,) + speech + speech


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Backbone (Qwen2.5-style temporal transformer).
  vocab_size: int = 320
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  intermediate_size: int = 160
  rms_norm_eps: float = 1e-5
  rope_theta: float = 1e6
  max_position_embeddings: int = 512
  # Depth transformer ("DepthGPT").
  depth_dim: int = 32
  depth_heads: int = 4
  depth_layers: int = 2
  depth_rms_eps: float = 1e-6  # hard-coded in the official DepthGPT RMSNorm
  # Streams and token ids.
  num_codebooks: int = 8
  audio_vocab_size: int = 2050
  text_wait_id: int = 317
  text_bos_id: int = 316
  text_eos_id: int = 318
  audio_pad_id: int = 2048
  audio_emp_id: int = 2049
  acoustic_delay: int = 1
  # muP multipliers.
  use_mup: bool = True
  input_mult: float = 1.5
  output_mult: float = 2.0
  mup_scale_factor: float = 4.0
  # Metadata kept for a faithful config.json round trip.
  initializer_range: float = 0.02
  mrope_section: tuple[int, ...] = (2, 3, 3)
  sliding_window: int | None = None
  checkpoint_dtype: str = 'float32'
  # Numerics: `dtype` for compute, `param_dtype` for storage.
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  # Layout (not official): the tensor-parallel size the text vocab and depth MLP are padded for,
  # so the mesh's tensor axis divides them (see padded_vocab_size, padded_depth_mlp_dim).
  tensor_parallel: int = 1

  def __post_init__(self):
    def need(ok, field, why):
      if not ok:
        raise ConfigError(f'ModelConfig.{field}: {why}')

    need(
      self.num_heads % self.num_kv_heads == 0,
      'num_kv_heads',
      f'{self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads',
    )
    need(self.head_dim % 2 == 0, 'head_dim', 'rotate-half RoPE needs an even head_dim')
    need(
      self.depth_dim % self.depth_heads == 0,
      'depth_heads',
      f'depth_dim {self.depth_dim} is not divisible by {self.depth_heads} heads',
    )
    need(
      0 <= self.text_wait_id < self.vocab_size,
      'text_wait_id',
      f'{self.text_wait_id} is outside the text vocab of {self.vocab_size}',
    )
    need(
      self.audio_pad_id < self.audio_vocab_size and self.audio_emp_id < self.audio_vocab_size,
      'audio_vocab_size',
      'PAD and EMP ids must lie inside the audio vocab',
    )
    need(self.tensor_parallel >= 1, 'tensor_parallel', f'{self.tensor_parallel} is not a size')
    for f in ('dtype', 'param_dtype', 'checkpoint_dtype'):
      need(
        getattr(self, f) in _DTYPES,
        f,
        f'unknown dtype {getattr(self, f)!r}; use one of {sorted(_DTYPES)}',
      )

  # ---- derived facts -------------------------------------------------------
  @property
  def num_channels(self) -> int:
    return 1 + 2 * self.num_codebooks

  @property
  def delays(self) -> tuple[int, ...]:
    return stream_delays(self.num_codebooks, self.acoustic_delay)

  @property
  def max_delay(self) -> int:
    return max(self.delays)

  @property
  def initial_column(self) -> tuple[int, ...]:
    """The official initial tokens per channel: text WAIT, every audio channel PAD. Also what
    fills a grid where a channel has no data."""
    return (self.text_wait_id,) + (self.audio_pad_id,) * (2 * self.num_codebooks)

  @property
  def grid_offsets(self) -> tuple[int, ...]:
    """Column of frame 0 per channel on the delayed grid: frame f of channel c sits at column
    f + grid_offsets[c].

    The model's own channels (text, speak) carry one more column than their delay: what the
    hidden state at column j predicts is written at j+1, after the initial column. The user's
    channels are written at (offset + delay), as the official LMGen does, so the model hears the
    user's frame f while it predicts its own frame f.
    """
    own = 1 + self.num_codebooks
    return tuple(d + (1 if c < own else 0) for c, d in enumerate(self.delays))

  @property
  def depth_head_dim(self) -> int:
    return self.depth_dim // self.depth_heads

  @property
  def depth_mlp_dim(self) -> int:
    return int(8 * self.depth_dim / 3)  # official MLP_swiglu sizing

  @property
  def padded_vocab_size(self) -> int:
    """The text vocab padded to a multiple of 128 x tensor_parallel: zero embedding rows and
    lm_head columns, logits masked to NEG_INF, never sampled and never a target."""
    return _round_up(self.vocab_size, 128 * self.tensor_parallel)

  @property
  def padded_depth_mlp_dim(self) -> int:
    """The depth MLP padded with zero gate/up/down units to a multiple of 128 x tensor_parallel:
    each tensor shard then holds whole 128-lane tiles, so TPUs store gate/up [.., d, f] row-major
    and the Pallas depth kernel reads them in place (2730 units would be re-laid out by a copy
    before every call)."""
    return _round_up(self.depth_mlp_dim, 128 * self.tensor_parallel)

  @property
  def text_logit_scale(self) -> float:
    return self.output_mult / self.mup_scale_factor if self.use_mup else 1.0

  @property
  def embed_scale(self) -> float:
    return self.input_mult if self.use_mup else 1.0

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  # ---- presets ---------------------------------------------------------------
  @classmethod
  def tiny(cls, **kw) -> ModelConfig:
    """Same as tests/golden/flm_tiny/config.json."""
    return cls(**kw)

  @classmethod
  def small(cls, **kw) -> ModelConfig:
    """~100M parameters, muP off: the CPU benchmark preset (docs/architecture.md §10)."""
    base = dict(
      vocab_size=32000,
      hidden_size=512,
      num_layers=8,
      num_heads=8,
      num_kv_heads=2,
      head_dim=64,
      intermediate_size=1536,
      depth_dim=256,
      depth_heads=4,
      depth_layers=4,
      text_wait_id=31999,
      text_bos_id=31997,
      text_eos_id=31998,
      use_mup=False,
      input_mult=1.0,
      output_mult=1.0,
      mup_scale_factor=1.0,
      mrope_section=(8, 12, 12),
      max_position_embeddings=4096,
    )
    return cls(**{**base, **kw})

  @classmethod
  def flm_8b(cls, **kw) -> ModelConfig:
    base = dict(
      vocab_size=151668,
      hidden_size=3584,
      num_layers=28,
      num_heads=28,
      num_kv_heads=4,
      head_dim=128,
      intermediate_size=18944,
      depth_dim=1024,
      depth_heads=16,
      depth_layers=6,
      text_wait_id=151665,
      text_bos_id=151643,
      text_eos_id=151645,
      input_mult=1.0,
      output_mult=28.0,
      mup_scale_factor=28.0,
      max_position_embeddings=8192,
      mrope_section=(16, 24, 24),
      sliding_window=32768,
      checkpoint_dtype='bfloat16',
      dtype='bfloat16',
      param_dtype='bfloat16',
    )
    return cls(**{**base, **kw})

  # ---- official config.json -------------------------------------------------
  @classmethod
  def from_official(cls, cfg: dict[str, Any] | str | os.PathLike, **kw) -> ModelConfig:
    """Parses an official config.json (a dict or a path). `kw` sets dtype/param_dtype."""
    if not isinstance(cfg, dict):
      with open(cfg, 'rb') as f:
        try:
          cfg = json.loads(f.read())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
          raise ConfigError(f'{cfg}: not a valid config.json ({e})') from None
    return cls(**_parse_official(cfg), **kw)

  def to_official(self) -> dict[str, Any]:
    return _render_official(self)


# The official model class: transformers' from_pretrained reads it from config.json.
ARCHITECTURE = 'FLMAudioForCausalLM'
# Fields whose value must be exactly this for the official architecture to hold.
_FIXED = {
  'attention_bias': True,
  'attention_dropout': 0.0,
  'disable_att_o_bias': True,
  'hidden_act': 'silu',
  'mlp_bias': False,
  'model_type': 'FLMAudio',
  'tie_word_embeddings': False,
  'pretraining_tp': 1,
}
_DEPTH_FIXED = {
  'bias': False,
  'dropout': 0.0,
  'use_cmlp': True,
  'use_rmsnorm': True,
  'use_swiglu': True,
}
# Fields transformers' loader uses and we accept without meaning.
_IGNORED = {
  '_attn_implementation_autoset',
  'transformers_version',
  'use_cache',
  'architectures',
  'auto_map',
  'torch_dtype',
  'initializer_range',
  'rope_scaling',
  'sliding_window',
}
_MAPPED = {
  'vocab_size': 'vocab_size',
  'hidden_size': 'hidden_size',
  'num_hidden_layers': 'num_layers',
  'num_attention_heads': 'num_heads',
  'num_key_value_heads': 'num_kv_heads',
  'head_dim': 'head_dim',
  'intermediate_size': 'intermediate_size',
  'rms_norm_eps': 'rms_norm_eps',
  'rope_theta': 'rope_theta',
  'max_position_embeddings': 'max_position_embeddings',
  'aud_channel': 'num_codebooks',
  'bos_token_id': 'text_bos_id',
  'eos_token_id': 'text_eos_id',
  'use_mup': 'use_mup',
  'input_mult': 'input_mult',
  'output_mult': 'output_mult',
  'mup_scale_factor': 'mup_scale_factor',
}


def model_config_from_json(d: dict) -> ModelConfig:
  """The ModelConfig a checkpoint's meta stored with dataclasses.asdict (lists back to tuples)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
  return ModelConfig(**kw)


def _parse_official(cfg: dict[str, Any]) -> dict[str, Any]:
  known = (
    set(_FIXED) | _IGNORED | set(_MAPPED) | {'aud_depthgpt', 'mm_token_info', 'aud_vocab_size'}
  )
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ConfigError(f'config.json: unknown field(s) {unknown}')
  missing = sorted((set(_MAPPED) | {'aud_depthgpt', 'mm_token_info', 'aud_vocab_size'}) - set(cfg))
  if missing:
    raise ConfigError(f'config.json: missing field(s) {missing}')
  for key, want in _FIXED.items():
    if key in cfg and cfg[key] != want:
      raise ConfigError(f'config.json: field {key!r} is {cfg[key]!r}; FLM-Audio needs {want!r}')
  out = {ours: cfg[theirs] for theirs, ours in _MAPPED.items()}
  depth = cfg['aud_depthgpt']
  for key, want in _DEPTH_FIXED.items():
    if depth.get(key, want) != want:
      raise ConfigError(
        f'config.json: field aud_depthgpt.{key!r} is {depth[key]!r}; needs {want!r}'
      )
  extra = sorted(set(depth) - set(_DEPTH_FIXED) - {'n_embd', 'n_head', 'n_layer'})
  if extra:
    raise ConfigError(f'config.json: unknown field(s) aud_depthgpt.{extra}')
  for key, ours in (
    ('n_embd', 'depth_dim'),
    ('n_head', 'depth_heads'),
    ('n_layer', 'depth_layers'),
  ):
    if key not in depth:
      raise ConfigError(f'config.json: missing field aud_depthgpt.{key!r}')
    out[ours] = depth[key]
  ids = cfg['mm_token_info']
  for key, ours in (
    ('text_wait_token_id', 'text_wait_id'),
    ('aud_pad_token_id', 'audio_pad_id'),
    ('aud_emp_token_id', 'audio_emp_id'),
  ):
    if key not in ids:
      raise ConfigError(f'config.json: missing field mm_token_info.{key!r}')
    out[ours] = ids[key]
  out['audio_vocab_size'] = cfg['aud_vocab_size']
  if out['hidden_size'] != out['num_heads'] * out['head_dim']:
    raise ConfigError(
      f"config.json: field 'head_dim' {out['head_dim']} times "
      f'num_attention_heads {out["num_heads"]} != hidden_size {out["hidden_size"]}'
    )
  rope = cfg.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise ConfigError(f"config.json: field 'rope_scaling' type {rope!r}; only default RoPE exists")
  out['mrope_section'] = tuple(rope.get('mrope_section', ()))
  out['sliding_window'] = cfg.get('sliding_window')
  out['initializer_range'] = cfg.get('initializer_range', 0.02)
  out['checkpoint_dtype'] = cfg.get('torch_dtype', 'bfloat16')
  return out


def _render_official(c: ModelConfig) -> dict[str, Any]:
  out: dict[str, Any] = {'_attn_implementation_autoset': True, 'architectures': [ARCHITECTURE]}
  out.update(_FIXED)
  out.update({theirs: getattr(c, ours) for theirs, ours in _MAPPED.items()})
  out['aud_vocab_size'] = c.audio_vocab_size
  out['aud_depthgpt'] = {
    **_DEPTH_FIXED,
    'n_embd': c.depth_dim,
    'n_head': c.depth_heads,
    'n_layer': c.depth_layers,
  }
  out['mm_token_info'] = {
    'aud_emp_token_id': c.audio_emp_id,
    'aud_pad_token_id': c.audio_pad_id,
    'text_wait_token_id': c.text_wait_id,
  }
  out['initializer_range'] = c.initializer_range
  out['rope_scaling'] = {
    'mrope_section': list(c.mrope_section),
    'rope_type': 'default',
    'type': 'default',
  }
  if c.sliding_window is not None:
    out['sliding_window'] = c.sliding_window
  out['torch_dtype'] = c.checkpoint_dtype
  out['transformers_version'] = '4.51.3'
  out['use_cache'] = True
  return dict(sorted(out.items()))

"""MimiConfig: the official loader's kwargs (golden/mimi/manifest.json `kwargs`) as one frozen
config.

Only what the released Mimi uses is supported (causal SEANet without norm, ELU, constant padding,
true skips, a RoPE/LayerNorm/layer-scale transformer without projections, a split RVQ with one
semantic codebook, learnt stride-2 resampling); anything else is refused by `from_kwargs`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class MimiConfig:
  # SEANet
  channels: int = 1
  dimension: int = 512  # latent width D (SEANet output, transformer d_model)
  n_filters: int = 64
  ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder runs them reversed
  kernel_size: int = 7
  residual_kernel_size: int = 3
  last_kernel_size: int = 3
  compress: int = 2
  dilation_base: int = 2
  n_residual_layers: int = 1
  # transformer (one each side)
  num_heads: int = 8
  num_layers: int = 8
  dim_feedforward: int = 2048
  context: int = 250  # attention window in 25 Hz steps
  max_period: float = 10000.0
  layer_scale: float = 0.01
  # split RVQ
  quantizer_dimension: int = 256
  quantizer_bins: int = 2048
  total_codebooks: int = 32  # in the checkpoint: 1 semantic + 31 acoustic
  num_codebooks: int = 8  # the ones used (FLM-Audio: the first 8)
  sample_rate: int = 24000
  frame_rate: float = 12.5

  def __post_init__(self):
    if self.channels != 1:
      raise ValueError(f'MimiConfig: channels {self.channels}: only mono Mimi is supported')
    if not 1 <= self.num_codebooks <= self.total_codebooks:
      raise ValueError(
        f'MimiConfig: num_codebooks {self.num_codebooks} must be in [1, {self.total_codebooks}]'
      )
    if self.dimension % self.num_heads or self.head_dim % 2:
      raise ValueError(
        f'MimiConfig: dimension {self.dimension} must split into {self.num_heads} '
        f'heads of an even size'
      )
    if self.frame_size * self.frame_rate != self.sample_rate or self.resample_stride < 1:
      raise ValueError(
        f'MimiConfig: sample_rate {self.sample_rate}, frame_rate '
        f'{self.frame_rate} and ratios {self.ratios} do not give whole frames'
      )

  @property
  def hop_length(self) -> int:  # samples per 25 Hz encoder step
    return math.prod(self.ratios)

  @property
  def frame_size(self) -> int:  # samples per 12.5 Hz frame (1920)
    return int(round(self.sample_rate / self.frame_rate))

  @property
  def resample_stride(self) -> int:  # encoder steps per frame (2)
    return self.frame_size // self.hop_length

  @property
  def head_dim(self) -> int:
    return self.dimension // self.num_heads

  @classmethod
  def full(cls, num_codebooks: int = 8) -> MimiConfig:
    """The released Mimi (96.2M parameters, context 250)."""
    return cls(num_codebooks=num_codebooks)

  @classmethod
  def small(cls, num_codebooks: int = 8) -> MimiConfig:
    """golden/mimi_small: the same layout, reduced widths, context 32."""
    return cls(
      dimension=64,
      n_filters=8,
      num_heads=4,
      num_layers=2,
      dim_feedforward=128,
      context=32,
      quantizer_dimension=32,
      total_codebooks=8,
      num_codebooks=num_codebooks,
    )

  @classmethod
  def from_kwargs(cls, kw: dict[str, Any], num_codebooks: int = 8) -> MimiConfig:
    """From the official loader's kwargs dict ({seanet, transformer, quantizer, ...})."""
    try:
      sea, tr, q = kw['seanet'], kw['transformer'], kw['quantizer']
      fixed = [
        (sea, 'causal', True),
        (sea, 'activation', 'ELU'),
        (sea, 'norm', 'none'),
        (sea, 'pad_mode', 'constant'),
        (sea, 'true_skip', True),
        (sea, 'disable_norm_outer_blocks', 0),
        (tr, 'causal', True),
        (tr, 'gating', 'none'),
        (tr, 'norm', 'layer_norm'),
        (tr, 'positional_embedding', 'rope'),
        (tr, 'conv_layout', True),
        (tr, 'd_model', sea['dimension']),
        (tr, 'input_dimension', sea['dimension']),
        (tr, 'output_dimensions', [sea['dimension']]),
        (q, 'input_dimension', sea['dimension']),
        (q, 'output_dimension', sea['dimension']),
      ]
      for section, name, want in fixed:
        got = section.get(name, want)
        if (list(got) if isinstance(got, tuple) else got) != want:
          raise ValueError(f'Mimi kwargs: {name}={got!r} is not supported (only {want!r})')
      return cls(
        channels=sea['channels'],
        dimension=sea['dimension'],
        n_filters=sea['n_filters'],
        ratios=tuple(sea['ratios']),
        kernel_size=sea['kernel_size'],
        residual_kernel_size=sea['residual_kernel_size'],
        last_kernel_size=sea['last_kernel_size'],
        compress=sea['compress'],
        dilation_base=sea['dilation_base'],
        n_residual_layers=sea['n_residual_layers'],
        num_heads=tr['num_heads'],
        num_layers=tr['num_layers'],
        dim_feedforward=tr['dim_feedforward'],
        context=tr['context'],
        max_period=float(tr['max_period']),
        layer_scale=float(tr['layer_scale']),
        quantizer_dimension=q['dimension'],
        quantizer_bins=q['bins'],
        total_codebooks=q['n_q'],
        num_codebooks=num_codebooks,
        sample_rate=kw.get('sample_rate', 24000),
        frame_rate=float(kw.get('frame_rate', 12.5)),
      )
    except KeyError as e:
      raise ValueError(f'Mimi kwargs: missing field {e}') from None

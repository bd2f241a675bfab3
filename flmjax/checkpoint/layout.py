"""The official PyTorch key layout and how each key maps onto flmjax's stacked parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from einops import rearrange

from flmjax.config import ModelConfig


@dataclass(frozen=True)
class Entry:
  key: str  # official state-dict key
  path: tuple[str, ...]  # our param, e.g. ('backbone', 'q')
  index: tuple[int, ...]  # leading indices into our stacked param
  kind: str  # 'copy' | 'flat' (reshape) | 'linear' (torch [out, in]) | 'split' (see below)
  n_in: int = 1  # for 'linear': how many leading dims of our slice form `in`
  real: tuple[int, ...] | None = None  # our slice without its layout padding (zeros), if padded

  def torch_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The official shape for our slice shape `ours`."""
    ours = self.real or ours
    if self.kind == 'split':  # ours [s, in, out] <-> torch [s*out, in] (fused q|k|v)
      return (ours[0] * ours[2], ours[1])
    if self.kind == 'copy':
      return ours
    if self.kind == 'flat':
      return (math.prod(ours),)
    return (math.prod(ours[self.n_in :]), math.prod(ours[: self.n_in]))

  def from_torch(self, w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    real = self.real or ours
    if self.kind == 'split':
      return rearrange(np.asarray(w), '(S O) I -> S I O', S=ours[0])
    w = np.asarray(w).T if self.kind == 'linear' else np.asarray(w)
    return np.pad(w.reshape(real), [(0, o - r) for o, r in zip(ours, real)])

  def to_torch(self, s: np.ndarray) -> np.ndarray:
    if self.real:  # strip the padding
      s = s[tuple(slice(0, r) for r in self.real)]
    if self.kind == 'split':
      return rearrange(s, 'S I O -> (S O) I')
    if self.kind == 'copy':
      return s
    if self.kind == 'flat':
      return s.reshape(-1)
    return s.reshape(math.prod(s.shape[: self.n_in]), -1).T


def entries(cfg: ModelConfig) -> list[Entry]:
  """All official keys, grouped by our parameter (so a writer holds one parameter at a time)."""
  out: list[Entry] = []
  add = lambda key, path, index, kind, n_in=1, real=None: out.append(
    Entry(key, path, index, kind, n_in, real)
  )
  V, D, dim, mlp = cfg.vocab_size, cfg.hidden_size, cfg.depth_dim, cfg.depth_mlp_dim
  b, e = 'backbone', 'model.embed_tokens'
  add(f'{e}.text_embeddings.weight', (b, 'text_embed'), (), 'copy', real=(V, D))
  for name, ours in (
    ('aud_speak_embeddings', 'speak_embed'),
    ('aud_listen_embeddings', 'listen_embed'),
  ):
    for c in range(cfg.num_codebooks):
      add(f'{e}.{name}.{c}.weight', (b, ours), (c,), 'copy')
  per_layer = (
    ('input_layernorm.weight', 'input_norm', 'copy', 1),
    ('self_attn.q_proj.weight', 'q', 'linear', 1),
    ('self_attn.q_proj.bias', 'q_bias', 'flat', 1),
    ('self_attn.k_proj.weight', 'k', 'linear', 1),
    ('self_attn.k_proj.bias', 'k_bias', 'flat', 1),
    ('self_attn.v_proj.weight', 'v', 'linear', 1),
    ('self_attn.v_proj.bias', 'v_bias', 'flat', 1),
    ('self_attn.o_proj.weight', 'o', 'linear', 2),
    ('post_attention_layernorm.weight', 'post_norm', 'copy', 1),
    ('mlp.gate_proj.weight', 'gate', 'linear', 1),
    ('mlp.up_proj.weight', 'up', 'linear', 1),
    ('mlp.down_proj.weight', 'down', 'linear', 1),
  )
  for suffix, ours, kind, n_in in per_layer:
    for i in range(cfg.num_layers):
      add(f'model.layers.{i}.{suffix}', (b, ours), (i,), kind, n_in)
  add('model.norm.weight', (b, 'final_norm'), (), 'copy')
  add('lm_head.weight', (b, 'lm_head'), (), 'linear', real=(D, V))
  d, a = 'depth_transformer', 'aud_output_layers'
  add(f'{a}.linear_in.weight', (d, 'linear_in'), (), 'linear')
  for c in range(cfg.num_codebooks):
    add(f'{a}.transformer.wtes.{c}.weight', (d, 'wtes'), (c,), 'copy')
  add(f'{a}.transformer.wpe.weight', (d, 'wpe'), (), 'copy')
  per_depth_layer = (
    ('ln_1.weight', 'ln_1', 'copy', 1),
    ('attn.c_attn.weight', 'qkv', 'split', 1),
    ('attn.c_proj.weight', 'proj', 'linear', 2),
    ('ln_2.weight', 'ln_2', 'copy', 1),
  )
  for suffix, ours, kind, n_in in per_depth_layer:
    for j in range(cfg.depth_layers):
      add(f'{a}.transformer.h.{j}.{suffix}', (d, ours), (j,), kind, n_in)
  for proj, real in (('gate', (dim, mlp)), ('up', (dim, mlp)), ('down', (mlp, dim))):
    for j in range(cfg.depth_layers):
      for c in range(cfg.num_codebooks):
        add(
          f'{a}.transformer.h.{j}.mlps.{c}.{proj}_proj.weight',
          (d, proj),
          (j, c),
          'linear',
          real=real,
        )
  add(f'{a}.transformer.ln_f.weight', (d, 'ln_f'), (), 'copy')
  for c in range(cfg.num_codebooks):
    add(f'{a}.lm_heads.{c}.weight', (d, 'heads'), (c,), 'linear')
  return out

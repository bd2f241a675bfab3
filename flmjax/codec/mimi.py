"""Mimi in JAX: 24 kHz mono <-> 8 codebooks at 12.5 Hz, in batch and streaming mode.

  encoder:  pcm [B,T] -> SEANet (25 Hz) -> transformer -> stride-2 conv (12.5 Hz) -> split RVQ
  decoder:  codes -> RVQ centroids -> stride-2 transposed conv (25 Hz) -> transformer -> SEANet

Pure functions of (cfg, params, ...) below; `Mimi` holds a config and its params and jits them.
A streaming state is a plain pytree whose leaves all have the batch (session) axis first:
SEANet conv tails / transposed-conv overhangs, the transformers' ring KV caches and offsets.
Batch mode equals streaming within the first `context` 25 Hz steps; after that each mode matches
its own official counterpart (see mimi_transformer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flmjax.codec import mimi_checkpoint, quantizer, seanet
from flmjax.codec import mimi_transformer as transformer
from flmjax.codec.mimi_config import MimiConfig


# ---------------------------------------------------------------------------- batch mode
def encode_latent(cfg: MimiConfig, params, pcm: jax.Array) -> jax.Array:
  """pcm float32 [B,T] -> unquantized latent [B,F,D], F = ceil(T / frame_size)."""
  B, T = pcm.shape
  pad = -T % cfg.frame_size  # the official encoder zero-pads to whole frames
  x = jnp.pad(pcm, ((0, 0), (0, pad)))[:, :, None]  # [B,T',1]
  h, _ = seanet.encode(cfg, params['encoder'], seanet.init_state(cfg, B, False), x)  # [B,2F,D]
  h = transformer.forward(cfg, params['encoder_transformer'], h)
  # The downsampler pads by repeating its first input (official pad_mode='replicate').
  tail = jnp.broadcast_to(h[:, :1], (B, cfg.resample_stride, h.shape[2]))
  latent, _ = seanet.conv1d(params['downsample'], h, tail, stride=cfg.resample_stride)
  return latent  # [B,F,D]


def encode(cfg: MimiConfig, params, pcm: jax.Array) -> jax.Array:
  """pcm float32 [B,T] -> codes int32 [B,K,F]."""
  return quantizer.encode(params['quantizer'], encode_latent(cfg, params, pcm))


def decode(cfg: MimiConfig, params, codes: jax.Array) -> jax.Array:
  """codes int [B,K,F] -> pcm float32 [B, F*frame_size]."""
  latent = quantizer.decode(params['quantizer'], codes)  # [B,F,D]
  B, _, D = latent.shape
  zero = jnp.zeros((B, cfg.resample_stride, D), latent.dtype)
  h, _ = seanet.depthwise_conv_transpose1d(
    params['upsample']['w'], latent, zero, cfg.resample_stride
  )  # [B,2F,D]
  h = transformer.forward(cfg, params['decoder_transformer'], h)
  y, _ = seanet.decode(cfg, params['decoder'], seanet.init_state(cfg, B, True), h)  # [B,T,1]
  return y[:, :, 0]


# ---------------------------------------------------------------------------- streaming mode
def init_stream(cfg: MimiConfig, batch: int):
  """A fresh streaming state for `batch` independent sessions (all leaves [B, ...])."""
  D, S = cfg.dimension, cfg.resample_stride
  return {
    'encoder': {
      'seanet': seanet.init_state(cfg, batch, False),
      'transformer': transformer.init_state(cfg, batch),
      'downsample': {'tail': jnp.zeros((batch, S, D)), 'first': jnp.ones((batch,), bool)},
    },
    'decoder': {
      'upsample': jnp.zeros((batch, S, D)),
      'transformer': transformer.init_state(cfg, batch),
      'seanet': seanet.init_state(cfg, batch, True),
    },
  }


def encode_step(cfg: MimiConfig, params, state, pcm: jax.Array):
  """state['encoder'], pcm float32 [B, frame_size] -> (new state['encoder'], codes int32 [B,K])."""
  h, sea = seanet.encode(cfg, params['encoder'], state['seanet'], pcm[:, :, None])  # [B,S,D]
  h, tr = transformer.step(cfg, params['encoder_transformer'], state['transformer'], h)
  first = state['downsample']['first']  # [B]: this session's first frame
  tail = jnp.where(first[:, None, None], h[:, :1], state['downsample']['tail'])  # [B,S,D]
  latent, tail = seanet.conv1d(params['downsample'], h, tail, stride=cfg.resample_stride)
  codes = quantizer.encode(params['quantizer'], latent)[:, :, 0]  # [B,K]
  new = {
    'seanet': sea,
    'transformer': tr,
    'downsample': {'tail': tail, 'first': jnp.zeros_like(first)},
  }
  return new, codes


def decode_step(cfg: MimiConfig, params, state, codes: jax.Array):
  """state['decoder'], codes int [B,K] -> (new state['decoder'], pcm float32 [B, frame_size])."""
  latent = quantizer.decode(params['quantizer'], codes[:, :, None])  # [B,1,D]
  h, up = seanet.depthwise_conv_transpose1d(
    params['upsample']['w'], latent, state['upsample'], cfg.resample_stride
  )  # [B,S,D]
  h, tr = transformer.step(cfg, params['decoder_transformer'], state['transformer'], h)
  y, sea = seanet.decode(cfg, params['decoder'], state['seanet'], h)  # [B,frame_size,1]
  return {'upsample': up, 'transformer': tr, 'seanet': sea}, y[:, :, 0]


def reset_slots(cfg: MimiConfig, state, mask: jax.Array):
  """Sessions where mask [B] is True restart from a fresh state; the others are untouched."""
  fresh = init_stream(cfg, mask.shape[0])
  pick = lambda new, old: jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  return jax.tree.map(pick, fresh, state)


# ---------------------------------------------------------------------------- the handle
class Mimi:
  """A Mimi config with its params and jitted entry points; see the module docstring.

  The streaming calls donate the state they are given: keep only the returned one.
  """

  def __init__(self, cfg: MimiConfig, params, axes=None):
    self.cfg = cfg
    self.params = jax.tree.map(jnp.asarray, params)
    self.axes = axes  # logical axis names, same tree as params
    self._encode = jax.jit(functools.partial(encode, cfg))
    self._encode_latent = jax.jit(functools.partial(encode_latent, cfg))
    self._decode = jax.jit(functools.partial(decode, cfg))
    self._encode_step = jax.jit(functools.partial(encode_step, cfg), donate_argnums=1)
    self._decode_step = jax.jit(functools.partial(decode_step, cfg), donate_argnums=1)
    self._reset = jax.jit(functools.partial(reset_slots, cfg), donate_argnums=0)

  @classmethod
  def random(cls, cfg: MimiConfig, seed: int = 0) -> Mimi:
    state_dict = mimi_checkpoint.random_state_dict(cfg, seed)
    return cls(cfg, *mimi_checkpoint.params_from_state_dict(cfg, state_dict.__getitem__))

  @property
  def sample_rate(self) -> int:
    return self.cfg.sample_rate

  @property
  def frame_size(self) -> int:
    return self.cfg.frame_size

  def encode(self, pcm, sample_rate: int | None = None) -> jax.Array:
    """float32 [B,T] at 24 kHz -> int32 [B,K,F], F = ceil(T / 1920)."""
    return self._encode(self.params, self._check_pcm(pcm, 'encode', sample_rate))

  def encode_latent(self, pcm, sample_rate: int | None = None) -> jax.Array:
    """float32 [B,T] -> the unquantized latent [B,F,D]."""
    return self._encode_latent(self.params, self._check_pcm(pcm, 'encode_latent', sample_rate))

  def decode(self, codes) -> jax.Array:
    """int [B,K,F] -> float32 [B, F*1920]."""
    return self._decode(self.params, self._check_codes(codes, 'decode', 3))

  def init_stream(self, batch: int):
    return init_stream(self.cfg, batch)

  def encode_step(self, state, pcm):
    """pcm float32 [B,1920] -> (state, codes int32 [B,K])."""
    pcm = self._check_pcm(pcm, 'encode_step', None, frame=True)
    enc, codes = self._encode_step(self.params, state['encoder'], pcm)
    return {**state, 'encoder': enc}, codes

  def decode_step(self, state, codes):
    """codes int [B,K] -> (state, pcm float32 [B,1920])."""
    dec, pcm = self._decode_step(
      self.params, state['decoder'], self._check_codes(codes, 'decode_step', 2)
    )
    return {**state, 'decoder': dec}, pcm

  def reset_slots(self, state, mask):
    """mask bool [B]: those sessions restart fresh (continuous batching); no recompile."""
    return self._reset(state, jnp.asarray(mask, bool))

  # -------------------------------------------------------------------------- input checks
  def _check_pcm(self, pcm, where: str, sample_rate: int | None, frame: bool = False):
    if sample_rate is not None and sample_rate != self.cfg.sample_rate:
      raise ValueError(
        f'Mimi.{where}: audio at {sample_rate} Hz; Mimi takes '
        f'{self.cfg.sample_rate} Hz (resample first, e.g. soxr.resample)'
      )
    pcm = np.asarray(pcm)
    if pcm.ndim != 2:
      raise ValueError(
        f'Mimi.{where}: pcm must be mono [batch, samples]; got shape {pcm.shape} '
        f'(for multi-channel audio pick one channel per session)'
      )
    if frame and pcm.shape[1] != self.cfg.frame_size:
      raise ValueError(
        f'Mimi.{where}: pcm must be one frame [batch, {self.cfg.frame_size}]; got shape {pcm.shape}'
      )
    problem = pcm_problem(pcm)
    if problem:
      raise ValueError(f'Mimi.{where}: {problem}')
    return jnp.asarray(pcm, jnp.float32)

  def _check_codes(self, codes, where: str, ndim: int):
    codes = np.asarray(codes)
    K, V = self.cfg.num_codebooks, self.cfg.quantizer_bins
    want = '[batch, codebooks, frames]' if ndim == 3 else '[batch, codebooks]'
    if codes.ndim != ndim or codes.shape[1] != K:
      raise ValueError(
        f'Mimi.{where}: codes must be {want} with {K} codebooks; got shape {codes.shape}'
      )
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f'Mimi.{where}: codes must be integers; got {codes.dtype}')
    if codes.size == 0:
      raise ValueError(f'Mimi.{where}: no codes (shape {codes.shape})')
    if codes.min() < 0 or codes.max() >= V:
      raise ValueError(
        f'Mimi.{where}: codes out of range [0, {V}): min {codes.min()}, max {codes.max()}'
      )
    return jnp.asarray(codes, jnp.int32)


def pcm_problem(pcm: np.ndarray) -> str | None:
  """What keeps audio samples from Mimi, any layout (Mimi's [batch, samples], MimiCodec's
  [samples]): none at all, not float, or NaN/inf. None when they are fine."""
  if pcm.size == 0:
    return f'empty audio (shape {pcm.shape})'
  if not np.issubdtype(pcm.dtype, np.floating):
    return f'pcm must be float samples in [-1, 1]; got {pcm.dtype}'
  if not np.isfinite(pcm).all():
    return 'pcm has NaN or infinite samples'
  return None


def load_mimi(path_or_dir: str, num_codebooks: int = 8) -> Mimi:
  """A Mimi safetensors file (or a directory holding one). The real config unless a
  config.json (official kwargs, e.g. golden/mimi_small) sits next to the file."""
  cfg, params, axes = mimi_checkpoint.read_checkpoint(path_or_dir, num_codebooks)
  return Mimi(cfg, params, axes)

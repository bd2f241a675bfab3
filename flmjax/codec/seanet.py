"""SEANet encoder/decoder of Mimi: causal 1-D convolutions in NWC layout, batch and streaming alike.

Every causal convolution keeps a left context ("tail") of `effective_kernel - stride` inputs, and
every transposed convolution (kernel = 2 * stride) its last input, which the next step's first
output block still needs (the official code keeps a `stride`-long output overhang instead).
A conv of ELU(x) takes x and `act=elu`, and its tail keeps inputs before ELU (ELU(0) = 0, so a
zero tail means the same): ELU then has one reader, the conv's input, into which XLA fuses it,
instead of writing ELU(x) out for the input and the next tail and reading it back.
A batch call is one streaming step from a fresh (zero) state, so the two modes share the code and
agree exactly, as the official StreamingConv1d / StreamingConvTranspose1d do.

Shapes: B batch, T time, C/I input channels, O output channels, K kernel taps, S stride.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flmjax.codec.mimi_config import MimiConfig
from flmjax.codec.mimi_transformer import dense

Params = dict
State = dict


# ---------------------------------------------------------------------------- layer geometry
def encoder_convs(cfg: MimiConfig) -> list[tuple[str, int, int, int, int, int]]:
  """(name, in, out, kernel, stride, dilation) of every encoder conv, in order."""
  nf, convs = cfg.n_filters, [('conv_in', cfg.channels, cfg.n_filters, cfg.kernel_size, 1, 1)]
  mult = 1
  for i, ratio in enumerate(reversed(cfg.ratios)):
    convs += _resblock_convs(cfg, f'blocks.{i}', mult * nf)
    convs.append((f'blocks.{i}.down', mult * nf, 2 * mult * nf, 2 * ratio, ratio, 1))
    mult *= 2
  convs.append(('conv_out', mult * nf, cfg.dimension, cfg.last_kernel_size, 1, 1))
  return convs


def decoder_convs(cfg: MimiConfig) -> list[tuple[str, int, int, int, int, int]]:
  """Same for the decoder; `up` entries are transposed convolutions."""
  mult = 2 ** len(cfg.ratios)
  nf = cfg.n_filters
  convs = [('conv_in', cfg.dimension, mult * nf, cfg.kernel_size, 1, 1)]
  for i, ratio in enumerate(cfg.ratios):
    convs.append((f'blocks.{i}.up', mult * nf, mult * nf // 2, 2 * ratio, ratio, 1))
    convs += _resblock_convs(cfg, f'blocks.{i}', mult * nf // 2)
    mult //= 2
  convs.append(('conv_out', nf, cfg.channels, cfg.last_kernel_size, 1, 1))
  return convs


def _resblock_convs(cfg: MimiConfig, prefix: str, dim: int):
  hidden = dim // cfg.compress
  out = []
  for j in range(cfg.n_residual_layers):
    out.append(
      (f'{prefix}.res.{j}.conv1', dim, hidden, cfg.residual_kernel_size, 1, cfg.dilation_base**j)
    )
    out.append((f'{prefix}.res.{j}.conv2', hidden, dim, 1, 1, 1))
  return out


def get(tree, name: str):
  for part in name.split('.'):
    tree = tree[int(part)] if isinstance(tree, list) else tree[part]
  return tree


# ---------------------------------------------------------------------------- primitives
def elu(x: jax.Array) -> jax.Array:
  """ELU as exp(x) - 1 on the negative side: XLA:CPU's expm1 is several times slower than exp
  and this is the SEANet's widest elementwise op; the two differ by at most 1 ulp of 1 (1.2e-7)."""
  return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


def conv1d(p: Params, x: jax.Array, tail: jax.Array, stride: int = 1, dilation: int = 1, act=None):
  """Causal conv of act(x) (act elementwise, e.g. elu; None: x). x [B,T,I], tail [B,P,I] (the
  previous inputs before act; P = (K-1)*dilation + 1 - stride), w [K,I,O].

  -> (y [B,T/S,O], new tail [B,P,I]).
  """
  T, P = x.shape[1], tail.shape[1]
  new_tail = jnp.concatenate([tail, x], axis=1)[:, T:]  # [B,P,I]: x's last P rows when T >= P
  # act on each part, then concatenate: XLA fuses act(x) into the concatenation (one pass over x),
  # where act of the concatenation would be a second pass over it.
  act = act or (lambda a: a)
  xx = jnp.concatenate([act(tail), act(x)], axis=1) if P else act(x)  # [B,P+T,I]
  K, I, O = p['w'].shape
  if stride == 1 and I == 1:  # the mono input conv: a fused sum over taps beats XLA:CPU's conv 5x
    y = sum(xx[:, k * dilation : k * dilation + T] * p['w'][k] for k in range(K))  # [B,T,O]
  elif stride == 1 and O == 1:  # the mono output conv: one [I,K] matmul, then shifted taps (3x)
    z = dense(xx, p['w'][:, :, 0].T)  # BTI,IK->BTK [B,P+T,K]
    y = sum(z[:, k * dilation : k * dilation + T, k] for k in range(K))[..., None]  # [B,T,1]
  else:
    y = jax.lax.conv_general_dilated(
      xx,
      p['w'],
      (stride,),
      'VALID',
      rhs_dilation=(dilation,),
      dimension_numbers=('NWC', 'WIO', 'NWC'),
    )  # [B,T/S,O]
  if 'b' in p:
    y = y + p['b']
  return y, new_tail


def conv_transpose1d(p: Params, x: jax.Array, tail: jax.Array, stride: int, act=None):
  """Causal transposed conv of act(x) with kernel 2S, as a kernel-2 conv to S*O channels: output
  block t ([S,O]) is x[t-1] @ w[k=S..2S) + x[t] @ w[k=0..S). x [B,T,I], w [2,I,S*O] (see
  mimi_checkpoint), tail [B,1,I] (the previous step's last input, before act).
  -> (y [B,T*S,O], tail). One conv, no overlap-add of [B,T,2,S,O] halves: less memory traffic
  than matmul + add."""
  B, T, _ = x.shape
  y, tail = conv1d({'w': p['w']}, x, tail, act=act)  # [B,T,S*O]
  y = y.reshape(B, T * stride, -1)  # [B,T*S,O]
  if 'b' in p:
    y = y + p['b']
  return y, tail


def depthwise_conv_transpose1d(w: jax.Array, x: jax.Array, partial: jax.Array, stride: int):
  """The channel-wise upsampler (groups = channels, no bias). w [K,C], x [B,T,C]."""
  B, T, C = x.shape
  z = jnp.einsum('BTC,KC->BTKC', x, w).reshape(B, T, 2, stride, C)  # [B,T,2,S,C]
  over = jnp.concatenate([partial[:, None], z[:, :-1, 1]], axis=1)  # [B,T,S,C]
  return (z[:, :, 0] + over).reshape(B, T * stride, C), z[:, -1, 1]


# ---------------------------------------------------------------------------- networks
def init_state(cfg: MimiConfig, batch: int, decoder: bool, dtype=jnp.float32) -> State:
  """Zero tails/partials of one SEANet, keyed by conv name. Leaves are [B, ...]."""
  state = {}
  for name, cin, _, k, s, d in (decoder_convs if decoder else encoder_convs)(cfg):
    if name.endswith('.up'):
      state[name] = jnp.zeros((batch, 1, cin), dtype)
    else:
      state[name] = jnp.zeros((batch, (k - 1) * d + 1 - s, cin), dtype)
  return state


def _resblocks(cfg, params, state, new, prefix, x):
  for j in range(cfg.n_residual_layers):
    name = f'{prefix}.res.{j}'
    h, new[f'{name}.conv1'] = conv1d(
      get(params, f'{name}.conv1'),
      x,
      state[f'{name}.conv1'],
      dilation=cfg.dilation_base**j,
      act=elu,
    )
    h, new[f'{name}.conv2'] = conv1d(
      get(params, f'{name}.conv2'), h, state[f'{name}.conv2'], act=elu
    )
    x = x + h
  return x


def encode(cfg: MimiConfig, params: Params, state: State, x: jax.Array):
  """x [B,T,channels] (T a multiple of hop_length) -> (h [B,T/hop,D], new state)."""
  new = {}
  h, new['conv_in'] = conv1d(params['conv_in'], x, state['conv_in'])
  for i, ratio in enumerate(reversed(cfg.ratios)):
    h = _resblocks(cfg, params, state, new, f'blocks.{i}', h)
    h, new[f'blocks.{i}.down'] = conv1d(
      params['blocks'][i]['down'], h, state[f'blocks.{i}.down'], stride=ratio, act=elu
    )
  h, new['conv_out'] = conv1d(params['conv_out'], h, state['conv_out'], act=elu)
  return h, new


def decode(cfg: MimiConfig, params: Params, state: State, h: jax.Array):
  """h [B,T,D] at 25 Hz -> (wave [B,T*hop,channels], new state)."""
  new = {}
  y, new['conv_in'] = conv1d(params['conv_in'], h, state['conv_in'])
  for i, ratio in enumerate(cfg.ratios):
    y, new[f'blocks.{i}.up'] = conv_transpose1d(
      params['blocks'][i]['up'], y, state[f'blocks.{i}.up'], ratio, act=elu
    )
    y = _resblocks(cfg, params, state, new, f'blocks.{i}', y)
  y, new['conv_out'] = conv1d(params['conv_out'], y, state['conv_out'], act=elu)
  return y, new

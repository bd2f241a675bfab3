"""Greedy streaming decoding of the golden stream with the Pallas depth kernels (interpret mode)
gives exactly the reference path's tokens, which are the official LMGen's (golden out_plain)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.kernels.depth_step import select_depth_layer_fn

pytestmark = pytest.mark.slow  # streaming decoding through interpret-mode kernels

GREEDY = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)


@pytest.fixture(scope='module')
def golden(tiny_dir):
  stream = np.load(tiny_dir / 'stream.npz')
  return np.transpose(stream['user'], (2, 0, 1)), stream['out_plain']  # [24,1,8], [24,9]


def decode(decoder, user):
  state = decoder.reset_slots(decoder.init(1), np.array([True]), sampling=GREEDY)
  outs = []
  for frame in user:
    state, out, valid = decoder.step(state, frame)
    outs.append(np.where(np.asarray(valid)[:, None], np.asarray(out), -1)[0])
  return np.stack(outs)


@pytest.fixture(scope='module')
def reference_tokens(tiny_model, golden):
  return decode(StreamingDecoder(tiny_model, GREEDY, max_len=32), golden[0])


@pytest.mark.parametrize('kernel', ['tpu', 'gpu'])
def test_greedy_golden_stream_matches_reference(tiny_model, golden, reference_tokens, kernel):
  if kernel == 'tpu':  # the decoder's own switch: on CPU it takes the TPU kernel in interpret mode
    decoder = StreamingDecoder(
      tiny_model, GREEDY, max_len=32, use_pallas=True, pallas_interpret=True
    )
  else:  # the Triton kernel set, forced, in interpret mode
    decoder = StreamingDecoder(
      tiny_model,
      GREEDY,
      max_len=32,
      depth_layer_fn=select_depth_layer_fn(kernel='gpu', interpret=True),
    )
  cfg = tiny_model.cfg
  # use_pallas hands the decoder the whole-stack entry (stacked weights and caches, leading L).
  stacked = kernel == 'tpu'
  fn = decoder.depth_layers_fn if stacked else decoder.depth_layer_fn
  lead = (cfg.depth_layers,) if stacked else ()
  x = jnp.zeros((1, cfg.depth_dim))
  kc = jnp.zeros(lead + (1, cfg.num_codebooks, cfg.depth_heads, cfg.depth_head_dim))
  p = {
    n: getattr(tiny_model.depth_transformer, n)[...]
    if stacked
    else getattr(tiny_model.depth_transformer, n)[...][0]
    for n in ('ln_1', 'qkv', 'proj', 'ln_2', 'gate', 'up', 'down')
  }
  traced = str(jax.make_jaxpr(functools.partial(fn, eps=1e-6))(p, x, kc, kc, jnp.int32(0)))
  assert 'pallas_call' in traced  # the decoder really runs the kernel
  tokens = decode(decoder, golden[0])
  np.testing.assert_array_equal(tokens, reference_tokens)
  np.testing.assert_array_equal(tokens, golden[1])


@pytest.mark.parametrize('kernel', ['tpu', 'gpu'])
def test_greedy_depth_frames_with_stacked_kernels(tiny_model, tiny_dir, kernel):
  """The whole-stack entry (layers_fn) in DepthTransformer.step: greedy depth frames on the 32
  golden backbone states give the reference path's codes exactly."""
  from flmjax.kernels.depth_step import select_depth_layers_fn
  from flmjax.kernels.reference import depth_frame
  from flmjax.model.depth import init_cache

  depth = tiny_model.depth_transformer
  hidden = np.load(tiny_dir / 'forward.npz')['hidden'].reshape(-1, tiny_model.cfg.hidden_size)
  cond = depth.conditioning(jnp.asarray(hidden))  # [32,C,d]
  cache = init_cache(tiny_model.cfg, cond.shape[0])
  want, _ = jax.jit(lambda s, c: depth_frame(depth, s, c))(cond, cache)
  layers_fn = select_depth_layers_fn(kernel=kernel, interpret=True)
  got, _ = jax.jit(lambda s, c: depth_frame(depth, s, c, layers_fn=layers_fn))(cond, cache)
  assert len(np.unique(np.asarray(want))) > 8  # a non-degenerate frame
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

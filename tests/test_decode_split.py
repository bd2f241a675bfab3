"""Split weights (StreamingDecoder(split_weights=True), flmjax.model.params.split_leading): the
layer and per-codebook weights as separate buffers, the frame's loops unrolled over them, give
the stacked decoder's tokens bit for bit, with the backbone KV cache per layer in the state; the
split leaves the model's own arrays alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from streams import run, users

from flmjax import sharding as shd
from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.decode import state as st
from flmjax.decode.decoder import SPLIT_AXES
from flmjax.model.params import split_leading

SAMPLED = SamplingConfig(temp_text=1.0, temp_audio=1.0, top_p_text=0.95, top_p_audio=0.9)


def test_split_leading_slices_without_touching_the_model(tiny_model):
  _, params = nnx.split(tiny_model)
  split = nnx.to_pure_dict(split_leading(params, SPLIT_AXES))
  whole = nnx.to_pure_dict(params)
  gate, q = whole['depth_transformer']['gate'], whole['backbone']['q']
  assert len(split['depth_transformer']['gate']) == gate.shape[0]
  assert len(split['depth_transformer']['gate'][1]) == gate.shape[1]
  np.testing.assert_array_equal(split['depth_transformer']['gate'][1][5], gate[1, 5])
  np.testing.assert_array_equal(split['backbone']['q'][1], q[1])
  assert split['backbone']['lm_head'] is whole['backbone']['lm_head']  # not named: as it was
  assert isinstance(tiny_model.backbone.q.get_value(), jax.Array)


def test_split_decoder_equals_the_stacked_one(tiny_model):
  """Sampled streams (temperature 1, top-p) of 4 sessions, then of one: every token equal."""
  user = users(4, 12, seed=4)
  outs = {}
  for split in (False, True):
    dec = StreamingDecoder(tiny_model, SAMPLED, max_len=32, overflow='slide', split_weights=split)
    assert dec.split_weights is split
    outs[split] = (
      run(dec, dec.init(4, seed=40), user)[1],
      run(dec, dec.init(1, seed=41), user[:, 1:2])[1],
    )
  np.testing.assert_array_equal(outs[True][0], outs[False][0])
  np.testing.assert_array_equal(outs[True][1], outs[False][1])
  assert (outs[True][0] >= 0).sum() > 200  # the streams did emit tokens


def test_per_layer_cache_resets_and_shards_as_the_stacked_one(tiny_model):
  """state.init(per_layer=True): the backbone cache as L [B,K,S,H] arrays per kind; reset zeroes
  the same rows as in the stacked [L,B,K,S,H] cache, and each leaf takes the stacked sharding's
  last four axes."""
  cfg, sampling = tiny_model.cfg, SamplingConfig()
  seeds = jnp.arange(4, dtype=jnp.uint32)
  stacked = st.init(cfg, sampling, 4, 8, seeds)
  split = st.init(cfg, sampling, 4, 8, seeds, per_layer=True)
  assert len(split['cache']['k']) == cfg.num_layers
  assert split['cache']['k'][0].shape == stacked['cache']['k'].shape[1:]
  rng = np.random.default_rng(0)
  full = {n: jnp.asarray(rng.normal(size=c.shape), c.dtype) for n, c in stacked['cache'].items()}
  stacked['cache'] = full
  split['cache'] = {n: tuple(c) for n, c in full.items()}
  mask = jnp.asarray([False, True, False, False])
  args = (mask, seeds, sampling.stream('text').per_row(4), sampling.stream('audio').per_row(4))
  want = st.reset(cfg, stacked, *args)['cache']
  got = st.reset(cfg, split, *args)['cache']
  for n in ('k', 'v'):
    np.testing.assert_array_equal(np.stack(got[n]), want[n])
    assert not np.asarray(want[n][:, 1]).any() and np.asarray(want[n][:, 0]).all()
  mesh = shd.make_mesh(data=2, tensor=2)
  specs = lambda s: st.shardings(s, mesh)['cache']['k']
  assert (
    tuple(specs(split)[0].spec) == tuple(specs(stacked).spec)[1:] == ('data', 'tensor', None, None)
  )


@pytest.mark.slow
def test_split_decoder_joins_leaves_and_slides_as_the_stacked_one(tiny_model):
  """4 sessions over a cache of 8 positions (overflow='slide' wraps it), a slot reset and one
  released mid-stream: the stacked decoder's tokens; and the per-layer cache holds what the same
  split frame writes into a stacked cache (given one: the form before it), entry for entry."""
  user = users(4, 14, seed=7)

  def stream(dec, state):
    state, first = run(dec, state, user[:6])
    state = dec.reset_slots(state, np.array([False, True, False, False]), seeds=5)
    state = dec.release_slots(state, np.array([False, False, True, False]))
    state, second = run(dec, state, user[6:])
    cache = {
      n: np.asarray(jnp.stack(c) if isinstance(c, tuple) else c) for n, c in state['cache'].items()
    }
    return np.concatenate([first, second]), cache

  stacked = StreamingDecoder(tiny_model, SAMPLED, max_len=8, overflow='slide', split_weights=False)
  split = StreamingDecoder(tiny_model, SAMPLED, max_len=8, overflow='slide', split_weights=True)
  want, _ = stream(stacked, stacked.init(4, seed=70))
  got, cache = stream(split, split.init(4, seed=70))
  seeds = np.arange(4, dtype=np.uint32) + 70
  whole = st.init(split.cfg, SAMPLED, 4, 8, jnp.asarray(seeds), split.penalty_buffers)
  assert not isinstance(whole['cache']['k'], tuple)
  tokens, whole_cache = stream(split, whole)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(tokens, want)
  for n in ('k', 'v'):  # the two programs fuse apart: float32 rounding may differ, not places
    np.testing.assert_allclose(cache[n], whole_cache[n], rtol=1e-5, atol=1e-6)
  assert (got[6:, 2] == -1).all() and (got[6:, 3] >= 0).any()

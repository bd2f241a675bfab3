"""Decoding under a mesh: the text token from vocab-sharded logits (never gathered) equals the
unsharded sampler's for the same key, and the Pallas depth kernels run in shard_map over the
session rows with replicated depth weights, giving the single-device greedy stream exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flmjax
from flmjax import sharding as shd
from flmjax.aot.compile import collectives_carrying
from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.decode.sampling import StreamParams, sample, sample_sharded
from flmjax.model.layers import NEG_INF

B, V, VP = 16, 300, 512  # rows; real vocab; padded for tensor=4 (a multiple of 128 x 4)


def logits_rows(seed=0):
  """[B,VP] float32: flat rows (a top-p boundary past the 64 candidates), peaked rows and rows
  with a tie at the top, the padding at NEG_INF as Backbone.text_logits(padded=True) gives."""
  rng = np.random.default_rng(seed)
  scale = np.repeat([0.3, 1.0, 3.0, 6.0], B // 4)[:, None]
  x = rng.normal(0, 1, (B, V)) * scale
  x[3, [17, 250]] = x[3].max() + 1.0  # a tie across two shards: the first id wins
  return np.concatenate([x, np.full((B, VP - V), NEG_INF)], axis=1).astype(np.float32)


CASES = {  # name: (temp, top_k, top_p, penalty, greedy)
  'greedy': (1.0, 0, 0.0, 1.0, True),
  'greedy_penalty': (1.0, 0, 0.0, 1.3, True),
  'top_k': (1.3, 5, 0.0, 1.0, False),
  'top_k_penalty': (0.7, 40, 0.0, 1.2, False),
  'top_p': (0.8, 0, 0.9, 1.1, False),
  'top_p_flat': (1.0, 0, 0.97, 1.0, False),
  'full': (1.0, 0, 0.0, 1.0, False),
}


@pytest.fixture(scope='module')
def mesh():
  return shd.make_mesh(data=2, tensor=4)


@pytest.fixture(scope='module')
def samplers(mesh):
  return jax.jit(sample), jax.jit(shd.traced_on(mesh, sample_sharded))


@pytest.mark.parametrize('case', sorted(CASES))
def test_vocab_sharded_sampler_equals_unsharded(samplers, mesh, case):
  temp, top_k, top_p, penalty, greedy = CASES[case]
  unsharded, sharded = samplers
  params = StreamParams(temp, top_k, top_p, penalty, 8, greedy).per_row(B)
  rng = np.random.default_rng(1)
  window = jnp.asarray(rng.integers(0, V, (B, 8)), jnp.int32)  # ids in every shard
  valid = jnp.asarray(rng.random((B, 8)) < 0.7)
  logits = jnp.asarray(logits_rows())
  draws_u, draws_s = [], []
  for seed in range(4):
    keys = jax.random.split(jax.random.key(seed), B)
    draws_u.append(np.asarray(unsharded(keys, logits, params, window, valid)))
    split = jax.device_put(logits, shd.named_sharding(('batch', 'vocab'), logits.shape, mesh))
    draws_s.append(np.asarray(sharded(keys, split, params, window, valid)))
  np.testing.assert_array_equal(np.stack(draws_s), np.stack(draws_u))
  draws = np.stack(draws_u)
  assert (draws < V).all()  # the padding is never drawn
  if greedy:
    assert (draws[:, 3] == 17).all()
  else:
    assert len(np.unique(draws)) > B, 'the draws must really sample'


def test_sharded_sampler_gathers_no_logits(samplers, mesh):
  """The compiled sampler moves only [B]-sized values and candidates between vocab shards."""
  _, sharded = samplers
  params = StreamParams(1.0, 0, 0.9, 1.1, 8, False).per_row(B)
  logits = jax.ShapeDtypeStruct(
    (B, VP), jnp.float32, sharding=shd.named_sharding(('batch', 'vocab'), (B, VP), mesh)
  )
  hlo = (
    sharded.lower(
      jax.random.split(jax.random.key(0), B),
      logits,
      params,
      jnp.zeros((B, 8), jnp.int32),
      jnp.zeros((B, 8), bool),
    )
    .compile()
    .as_text()
  )
  assert 'all-gather' in hlo or 'all-reduce' in hlo  # it is really split
  for width in (VP, VP // 4):  # the whole vocab, or one shard's slice
    assert collectives_carrying(hlo, (width,)) == []


def golden_user(tiny_dir, batch):
  stream = np.load(tiny_dir / 'stream.npz')
  user = np.transpose(stream['user'], (2, 0, 1))  # [24,1,8]
  return np.repeat(user, batch, axis=1), stream['out_plain']


@pytest.mark.slow
def test_pallas_depth_under_mesh_gives_the_golden_greedy_stream(tiny_dir):
  """Mesh (data=4, tensor=2), use_pallas=True (TPU kernel, interpret mode): 8 sessions, rows
  over data x tensor, every session's greedy stream equals the official out_plain, which the
  single-device reference path also gives (tests/test_kernels_decode.py)."""
  greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  mesh = shd.make_mesh(data=4, tensor=2)
  model = flmjax.load_official(str(tiny_dir), dtype='float32', mesh=mesh)
  dec = StreamingDecoder(
    model, greedy, max_len=32, mesh=mesh, use_pallas=True, pallas_interpret=True
  )
  gate = dec.params['depth_transformer']['gate'][...]
  assert gate.sharding.is_fully_replicated  # stored whole: never gathered per frame
  assert dec.params['backbone']['q'][...].sharding.spec[2] == 'tensor'
  user, want = golden_user(tiny_dir, 8)
  state = dec.init(8)
  lowered = dec._compiled(8)['frame'].lower(dec.params, state, user[0])
  assert 'shard_map' in lowered.as_text() or 'sdy.manual_computation' in lowered.as_text()
  outs = []
  for frame in user:
    state, out, valid = dec.step(state, frame)
    outs.append(np.where(np.asarray(valid)[:, None], np.asarray(out), -1))
  outs = np.stack(outs)  # [24,8,9]
  for b in range(8):
    np.testing.assert_array_equal(outs[:, b], want, err_msg=f'session {b}')

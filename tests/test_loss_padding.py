"""The blocked text and audio losses and the fused cross-entropy against the plain ones, and the
padded vocab / depth MLP layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flmjax
from flmjax.checkpoint import safetensors_io as st
from flmjax.config import ModelConfig
from flmjax.model import flm
from flmjax.model import loss as loss_lib

F32_TOL = 1e-6  # float32, relative: the blocks compute the same numbers as the whole
BF16_TOL = 2e-2  # bf16 compute vs float32, relative error of the loss and of its gradient


def _batch(cfg, b=2, t=21, seed=0):
  """tokens [B,Z,T] with real ids, weights [B,Z,T] with some zeros."""
  rng = np.random.default_rng(seed)
  text = rng.integers(0, cfg.vocab_size, (b, 1, t))
  audio = rng.integers(0, cfg.audio_pad_id, (b, 2 * cfg.num_codebooks, t))
  tokens = jnp.asarray(np.concatenate([text, audio], 1), jnp.int32)
  weights = jnp.asarray(rng.random(tokens.shape) * (rng.random(tokens.shape) > 0.2), jnp.float32)
  return tokens, weights


def _plain_loss(model, tokens, weights):
  """The reference: Σ w·ce of the text stream from the whole [B,T,V] float32 log-softmax."""
  out = model(**loss_lib.model_inputs(model.cfg, tokens))
  logp = jax.nn.log_softmax(out.text_logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, tokens[:, 0, 1:, None], axis=-1)[..., 0]
  return jnp.sum(weights[:, 0, 1:] * ce), jnp.argmax(out.text_logits, -1)


def _grads(model, f):
  graphdef, params = nnx.split(model)
  return jax.jit(jax.grad(lambda p: f(nnx.merge(graphdef, p))))(params)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope='module')
def model():
  return flm.create(ModelConfig.tiny(tensor_parallel=2), seed=1)  # vocab 320 padded to 512


@pytest.mark.slow
def test_chunked_text_loss_equals_plain(model):
  tokens, weights = _batch(model.cfg)
  # 20 columns in blocks of 6: three whole blocks and a padded one.
  sums = jax.jit(lambda m: loss_lib.loss_sums(m, tokens, weights, text_block=6))(model)
  want, pred = jax.jit(lambda m: _plain_loss(m, tokens, weights))(model)
  assert abs(float(sums['text_wce']) - float(want)) <= F32_TOL * abs(float(want))
  words = (weights[:, 0, 1:] > 0) & (tokens[:, 0, 1:] != model.cfg.text_wait_id)
  assert float(sums['text_correct']) == float(jnp.sum(words & (pred == tokens[:, 0, 1:])))
  got = _grads(model, lambda m: loss_lib.loss_sums(m, tokens, weights, text_block=6)['text_wce'])
  ref = _grads(model, lambda m: _plain_loss(m, tokens, weights)[0])
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
    if np.any(r):
      assert _rel(g, r) < 1e-5, path
    else:
      assert not np.any(g), path


def _plain_audio(model, tokens, weights):
  """The reference: Σ w·ce per audio stream from the whole [B,T,C,A] float32 log-softmax."""
  out = model(**loss_lib.model_inputs(model.cfg, tokens))
  C = model.cfg.num_codebooks
  tgt = jnp.swapaxes(tokens[:, 1 : 1 + C, 1:], 1, 2)  # [B,T,C]
  w = jnp.swapaxes(weights[:, 1 : 1 + C, 1:], 1, 2)
  logp = jax.nn.log_softmax(out.depth_logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  hit = (w > 0) & (jnp.argmax(out.depth_logits, -1) == tgt)
  return {
    'semantic_wce': jnp.sum(w[..., 0] * ce[..., 0]),
    'acoustic_wce': jnp.sum(w[..., 1:] * ce[..., 1:]),
    'semantic_correct': jnp.sum(hit[..., 0]),
    'acoustic_correct': jnp.sum(hit[..., 1:]),
  }


@pytest.mark.slow
def test_codebook_audio_loss_equals_plain(model):
  tokens, weights = _batch(model.cfg, seed=5)
  sums = jax.jit(lambda m: loss_lib.loss_sums(m, tokens, weights))(model)
  want = jax.jit(lambda m: _plain_audio(m, tokens, weights))(model)
  for k in ('semantic_wce', 'acoustic_wce'):
    assert abs(float(sums[k]) - float(want[k])) <= F32_TOL * abs(float(want[k])), k
  for k in ('semantic_correct', 'acoustic_correct'):
    assert float(sums[k]) == float(want[k]), k  # random logits: no ties, so hit == argmax
  audio = lambda s: s['semantic_wce'] + s['acoustic_wce']
  got = _grads(model, lambda m: audio(loss_lib.loss_sums(m, tokens, weights)))
  ref = _grads(model, lambda m: audio(_plain_audio(m, tokens, weights)))
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
    if np.any(r):
      assert _rel(g, r) < 1e-5, path
    else:
      assert not np.any(g), path


@pytest.mark.slow
def test_codebook_audio_loss_bf16_against_float32(model):
  tokens, weights = _batch(model.cfg, seed=6)
  f32 = lambda m: (lambda s: s['semantic_wce'] + s['acoustic_wce'])(
    loss_lib.loss_sums(m, tokens, weights)
  )
  bf16 = flm.create(model.cfg.replace(dtype='bfloat16'), seed=1)  # same float32 weights
  assert _rel(jax.jit(f32)(bf16), jax.jit(f32)(model)) < BF16_TOL
  g16 = _grads(bf16, f32)['depth_transformer']['heads']
  g32 = _grads(model, f32)['depth_transformer']['heads']
  assert _rel(g16, g32) < BF16_TOL


def test_fused_cross_entropy_against_log_softmax():
  x = jax.random.normal(jax.random.key(0), (3, 5, 300)) * 4  # [B,T,V]
  t = jax.random.randint(jax.random.key(1), (3, 5), 0, 300)
  w = jax.random.uniform(jax.random.key(2), (3, 5))
  plain = lambda x: -jnp.take_along_axis(jax.nn.log_softmax(x, -1), t[..., None], -1)[..., 0]
  ce, hit, also = loss_lib._ce(x, t, 7)
  assert _rel(ce, plain(x)) < F32_TOL
  np.testing.assert_array_equal(hit, jnp.argmax(x, -1) == t)
  np.testing.assert_array_equal(also, jnp.argmax(x, -1) == 7)
  g = jax.grad(lambda x: jnp.sum(w * loss_lib._ce(x, t)[0]))(x)
  assert _rel(g, jax.grad(lambda x: jnp.sum(w * plain(x)))(x)) < 1e-5
  # A tie at the top counts as a hit for every tied id (argmax would take the first only).
  tied = jnp.zeros((1, 4)).at[0, 1].set(1.0).at[0, 3].set(1.0)
  _, hit1, also3 = loss_lib._ce(tied, jnp.array([1]), 3)
  assert bool(hit1[0]) and bool(also3[0])
  assert not bool(loss_lib._ce(tied, jnp.array([0]))[1][0])


@pytest.mark.slow
def test_chunked_text_loss_bf16_against_float32(model):
  tokens, weights = _batch(model.cfg)
  f32 = lambda m: loss_lib.loss_sums(m, tokens, weights, text_block=6)['text_wce']
  bf16 = flm.create(model.cfg.replace(dtype='bfloat16'), seed=1)  # same float32 weights
  assert _rel(jax.jit(f32)(bf16), jax.jit(f32)(model)) < BF16_TOL
  g16, g32 = _grads(bf16, f32)['backbone']['lm_head'], _grads(model, f32)['backbone']['lm_head']
  assert _rel(g16, g32) < BF16_TOL


@pytest.mark.slow
def test_padding_is_exact_and_stays_zero(model):
  cfg = model.cfg
  assert (cfg.padded_vocab_size, ModelConfig.tiny().padded_vocab_size) == (512, 384)
  assert ModelConfig.flm_8b(tensor_parallel=4).padded_depth_mlp_dim == 3072  # 2730 -> 4 x 768
  plain = flm.create(ModelConfig.tiny(), seed=1)
  bb, V, f = model.backbone, cfg.vocab_size, cfg.depth_mlp_dim
  assert not np.any(bb.text_embed[...][V:]) and not np.any(bb.lm_head[...][:, V:])
  np.testing.assert_array_equal(bb.lm_head[...][:, :V], plain.backbone.lm_head[...][:, :V])
  tokens, _ = _batch(cfg)
  inputs = loss_lib.model_inputs(cfg, tokens)
  forward = nnx.jit(lambda m, inputs: m(**inputs))
  out, ref = forward(model, inputs), forward(plain, inputs)
  assert out.text_logits.shape[-1] == V  # the public outputs cover the real vocab only
  np.testing.assert_array_equal(out.text_logits, ref.text_logits)
  np.testing.assert_array_equal(out.depth_logits, ref.depth_logits)
  padded = jax.jit(lambda h: bb.text_logits(h, padded=True))(out.hidden)
  assert padded.shape[-1] == 512 and float(jnp.max(padded[..., V:])) < -1e29
  tokens, weights = _batch(cfg, seed=3)
  g = _grads(model, lambda m: loss_lib.objective(loss_lib.loss_sums(m, tokens, weights))[0])
  assert np.any(g['backbone']['lm_head'][:, :V]) and not np.any(g['backbone']['lm_head'][:, V:])
  assert not np.any(g['backbone']['text_embed'][V:])
  assert cfg.replace(tensor_parallel=3).padded_depth_mlp_dim == 384 != f  # 85 -> 3 x 128
  three = flm.create(cfg.replace(tensor_parallel=3), seed=1).depth_transformer
  assert not np.any(three.gate[...][..., f:]) and not np.any(three.down[...][..., f:, :])


def test_official_round_trip_strips_padding_bit_exact(tiny_dir, tmp_path):
  """golden -> padded for tensor=4 -> save_official: every tensor equal to the golden's."""
  model = flmjax.load_official(str(tiny_dir), dtype='float32', tensor_parallel=4)
  assert model.backbone.text_embed[...].shape == (512, 64)
  out = flmjax.save_official(model, str(tmp_path / 'out'), dtype='float32')
  ours, theirs = (
    st.read_header(out + '/model.safetensors'),
    st.read_header(str(tiny_dir / 'model.safetensors')),
  )
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    a, b = st.read_tensor(ours[key]), st.read_tensor(theirs[key])
    assert a.shape == b.shape and a.tobytes() == b.tobytes(), key

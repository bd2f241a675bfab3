"""Issue 2: the Flax model against the official PyTorch forward (golden fixtures)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import flmjax
from flmjax.model import backbone as backbone_lib
from flmjax.model import depth as depth_lib

REL_TOL = 1e-5  # float32, ||ours - ref|| / ||ref||


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(ours - ref) / np.linalg.norm(ref)


@pytest.fixture(scope='module')
def forward_ref(tiny_dir):
  return dict(np.load(tiny_dir / 'forward.npz'))


@pytest.fixture(scope='module')
def outputs(tiny_model, forward_ref):
  r = forward_ref
  return tiny_model(r['text'], r['speak'], r['listen'], r['depth_tokens'][..., :-1])


@pytest.mark.parametrize('name', ['hidden', 'text_logits', 'depth_logits'])
def test_forward_matches_official(outputs, forward_ref, name):
  ours = getattr(outputs, name)
  assert ours.shape == forward_ref[name].shape
  assert rel_err(ours, forward_ref[name]) < REL_TOL


@pytest.mark.parametrize('name', ['text_logits', 'depth_logits'])
def test_argmax_of_every_row_matches(outputs, forward_ref, name):
  np.testing.assert_array_equal(
    np.asarray(getattr(outputs, name)).argmax(-1), forward_ref[name].argmax(-1)
  )


def test_no_depth_prev_gives_no_depth_logits(tiny_model, forward_ref):
  r = forward_ref
  out = tiny_model(r['text'][:, :4], r['speak'][:, :4], r['listen'][:, :4])
  assert out.depth_logits is None and out.text_logits.shape == (2, 4, 320)


def test_official_shapes_equal_8b_manifest(golden_dir):
  manifest = json.loads((golden_dir / 'flm_8b' / 'manifest.json').read_text())
  shapes = flmjax.official_shapes(flmjax.ModelConfig.flm_8b())
  assert shapes == {k: tuple(v[0]) for k, v in manifest['tensors'].items()}
  assert len(shapes) == 542
  assert sum(int(np.prod(s)) for s in shapes.values()) == manifest['total_params'] == 8_221_022_720


@pytest.mark.slow
def test_cached_backbone_steps_equal_full_forward(tiny_model, forward_ref):
  """The KV-cache path (used by decoding) reproduces the teacher-forced hidden states."""
  r, bb = forward_ref, tiny_model.backbone
  b, t = r['text'].shape
  x = bb.embed(r['text'], r['speak'], r['listen'])
  cache = backbone_lib.init_cache(bb.cfg, b, max_len=t + 3)
  hs = []
  for i in range(t):
    h, cache = bb(x[:, i : i + 1], jnp.full((b, 1), i, jnp.int32), cache)
    hs.append(h)
  assert rel_err(jnp.concatenate(hs, axis=1), r['hidden']) < REL_TOL


@pytest.mark.slow
def test_depth_steps_equal_teacher_forced(tiny_model, forward_ref):
  r, dt = forward_ref, tiny_model.depth_transformer
  hidden = jnp.asarray(r['hidden'][0])  # [T, D] as a batch of T rows
  tokens = jnp.asarray(r['depth_tokens'][0])  # [T, 8]
  cond = dt.conditioning(hidden)
  cache = depth_lib.init_cache(dt.cfg, hidden.shape[0])
  prev = jnp.full((hidden.shape[0],), dt.cfg.audio_emp_id, jnp.int32)
  for c in range(8):
    logits, cache = dt.step(cond, prev, jnp.int32(c), cache)
    assert rel_err(logits, r['depth_logits'][0, :, c]) < REL_TOL, f'codebook {c}'
    prev = tokens[:, c]


@pytest.mark.slow
def test_bfloat16_forward_close_to_float32(tiny_dir, forward_ref):
  model = flmjax.load_official(str(tiny_dir), dtype='bfloat16')
  assert model.backbone.q[...].dtype == jnp.bfloat16
  r = forward_ref
  out = model(r['text'], r['speak'], r['listen'], r['depth_tokens'][..., :-1])
  assert out.text_logits.dtype == jnp.bfloat16
  assert rel_err(out.text_logits.astype(jnp.float32), r['text_logits']) < 2e-2  # bf16 rounding
  # bf16 compute over fp32 params (the training set-up).
  mixed = flmjax.load_official(str(tiny_dir), dtype='bfloat16', param_dtype='float32')
  assert mixed.backbone.q[...].dtype == jnp.float32
  out = mixed(r['text'], r['speak'], r['listen'])
  assert rel_err(out.hidden.astype(jnp.float32), r['hidden']) < 2e-2


def test_params_carry_logical_axes(tiny_model):
  from flax import nnx

  for path, var in nnx.to_flat_state(nnx.state(tiny_model)):
    axes = var.get_metadata().get('axes')
    assert axes is not None and len(axes) == var.get_value().ndim, path

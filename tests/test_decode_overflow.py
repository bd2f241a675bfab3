"""What happens when a session outlives the KV cache: overflow='error' and overflow='slide'."""

import jax.numpy as jnp
import numpy as np
import pytest

from flmjax.decode import SamplingConfig, SessionOverflowError, StreamingDecoder
from flmjax.model import backbone, layers
from flmjax.model.params import values

GREEDY = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
MAX_LEN = 6
FRAMES = 14


def user_frames(frames=FRAMES):
  return np.random.default_rng(5).integers(0, 2048, (frames, 1, 8)).astype(np.int32)


@pytest.mark.slow
def test_error_policy_raises_past_max_len(tiny_model):
  dec = StreamingDecoder(tiny_model, GREEDY, max_len=MAX_LEN, overflow='error')
  state = dec.init(1)
  user = user_frames()
  for frame in user[:MAX_LEN]:  # positions 0..MAX_LEN-1 fit
    state, _, _ = dec.step(state, frame)
  with pytest.raises(SessionOverflowError, match=r'slot\(s\) \[0\] reached max_len=6 frames'):
    dec.step(state, user[MAX_LEN])
  # A released slot no longer counts; a reset one starts over.
  state = dec.release_slots(state, np.array([True]))
  state, _, valid = dec.step(state, user[MAX_LEN])
  assert not bool(valid[0])
  state = dec.reset_slots(state, np.array([True]))
  state, _, _ = dec.step(state, user[0])
  assert int(state['offset'][0]) == 1


def banded_forward(model, columns, window):
  """Teacher-forced backbone over columns [T,17] where position t attends t-window < s <= t:
  the sliding-window model that overflow='slide' decodes (written out from the model's layers)."""
  bb, cfg = model.backbone, model.cfg
  cols = jnp.asarray(columns)[None]  # [1,T,17]
  x = bb.embed(cols[..., 0], cols[..., 1:9], cols[..., 9:])
  t = jnp.arange(cols.shape[1])
  mask = ((t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window))[None]  # [1,T,S]
  cos, sin = layers.rope_tables(t[None], cfg.head_dim, cfg.rope_theta, jnp.float32)
  stacked = values(bb, backbone.LAYER_PARAMS, jnp.float32)
  for i in range(cfg.num_layers):
    p = {k: v[i] for k, v in stacked.items()}
    h = layers.rms_norm(x, p['input_norm'], cfg.rms_norm_eps)
    q = jnp.einsum('BTD,DNH->BTNH', h, p['q']) + p['q_bias']
    k = jnp.einsum('BTD,DKH->BTKH', h, p['k']) + p['k_bias']
    v = jnp.einsum('BTD,DKH->BTKH', h, p['v']) + p['v_bias']
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    x = x + jnp.einsum('BTNH,NHD->BTD', layers.gqa_attention(q, k, v, mask), p['o'])
    h = layers.rms_norm(x, p['post_norm'], cfg.rms_norm_eps)
    x = x + layers.swiglu(h, p['gate'], p['up'], p['down'])
  return layers.rms_norm(x, bb.final_norm[...], cfg.rms_norm_eps)  # [1,T,D]


@pytest.mark.slow
def test_slide_policy_is_a_sliding_window_model(tiny_model):
  """Past max_len, each frame attends to the last max_len frames, at every layer."""
  dec = StreamingDecoder(tiny_model, GREEDY, max_len=MAX_LEN, overflow='slide')
  full = StreamingDecoder(tiny_model, GREEDY, max_len=32)
  state, ref_state = dec.init(1), full.init(1)
  columns, sampled, outs, ref_outs = [], [], [], []
  for frame in user_frames():
    state, out, _ = dec.step(state, frame)
    ref_state, ref_out, _ = full.step(ref_state, frame)
    outs.append(np.asarray(out)[0])
    ref_outs.append(np.asarray(ref_out)[0])
    columns.append(np.asarray(dec.input_column(state))[0])
    ring, offset = np.asarray(state['ring'])[0], int(state['offset'][0])
    sampled.append(ring[:9, offset % ring.shape[1]])  # text + speak sampled at this step
  assert int(state['offset'][0]) == FRAMES
  # Inside the cache the two policies are the same decoder; past it they differ.
  outs, ref_outs = np.stack(outs), np.stack(ref_outs)
  np.testing.assert_array_equal(outs[:MAX_LEN], ref_outs[:MAX_LEN])
  assert (outs[MAX_LEN:] != ref_outs[MAX_LEN:]).any()
  hidden = banded_forward(tiny_model, np.stack(columns), MAX_LEN)[0]  # [T,D]
  sampled = np.stack(sampled)  # [T,9]
  text = jnp.argmax(tiny_model.backbone.text_logits(hidden[None])[0], -1)
  np.testing.assert_array_equal(np.asarray(text), sampled[:, 0])
  logits = tiny_model.depth_transformer(hidden[None], jnp.asarray(sampled[None, :, 1:8]))
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0], -1)), sampled[:, 1:])

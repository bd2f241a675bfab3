"""Split weights (StreamingDecoder(split_weights=True), flmjax.model.params.split_leading): the
layer and per-codebook weights as separate buffers, the frame's loops unrolled over them, give
the stacked decoder's tokens bit for bit; the split leaves the model's own arrays alone."""

import jax
import numpy as np
from flax import nnx
from streams import run, users

from flmjax.decode import SamplingConfig, StreamingDecoder
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

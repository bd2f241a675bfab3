"""The data iterator's state in a run's checkpoint: written and read by grain's own orbax handler
(grain.checkpoint), each process its own JSON file; a step written before flmjax used it (JSON
wrapped in {'state': ...}) still resumes, and a pickled state is refused, never unpickled."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from flmjax.checkpoint.checkpointer import Checkpointer
from flmjax.checkpoint.safetensors_io import CorruptCheckpointError
from flmjax.config import ModelConfig
from flmjax.data.grid import LossWeights
from flmjax.train.data import RandomGridIterator
from flmjax.train.state import TrainState

STATE = TrainState({'w': jnp.arange(4, dtype=jnp.float32)}, {'count': jnp.zeros((), jnp.int32)})


def _loader():
  cfg = ModelConfig.tiny()
  return RandomGridIterator(cfg, window=12, batch_size=2, seed=5, loss_weights=LossWeights())


@pytest.fixture
def saved(tmp_path):
  """Step 3 saved after two batches of a loader, and the batch that came next."""
  loader = _loader()
  next(loader), next(loader)
  ckpt = Checkpointer(tmp_path / 'checkpoints', use_async=False)
  ckpt.save(3, STATE, {'step_in_stage': 2}, loader, force=True)
  ckpt.wait()
  return ckpt, next(loader)


def _data_file(ckpt):
  return ckpt.directory / '3' / 'data' / 'process_0-of-1.json'


def _resumed(ckpt):
  state, meta, data = ckpt.restore(STATE, 3, data=_loader())
  assert meta['step_in_stage'] == 2 and np.array_equal(state.params['w'], STATE.params['w'])
  return data


def test_grain_handler_writes_and_resumes_the_state(saved):
  ckpt, want = saved
  assert json.loads(_data_file(ckpt).read_text()) == {'next_index': 4}
  got = next(_resumed(ckpt))
  for k in ('tokens', 'weights'):
    assert np.array_equal(got[k], want[k])
  ckpt.close()


def test_a_step_saved_before_grain_handler_resumes(saved):
  ckpt, want = saved
  _data_file(ckpt).write_text(json.dumps({'state': {'json': {'next_index': 4}}}))
  assert np.array_equal(next(_resumed(ckpt))['tokens'], want['tokens'])
  _data_file(ckpt).write_text(json.dumps({'state': None}))  # no state: the stage starts over
  assert _resumed(ckpt).get_state() == {'next_index': 0}
  ckpt.close()


def test_a_pickled_state_is_refused(saved):
  ckpt, _ = saved
  _data_file(ckpt).write_text(json.dumps({'state': {'pickle': 'gASVAAAAAAAAAAB9lC4='}}))
  with pytest.raises(CorruptCheckpointError, match='a pickled data state, which flmjax never'):
    _resumed(ckpt)
  ckpt.close()


def test_no_data_item_without_an_iterator(tmp_path):
  ckpt = Checkpointer(tmp_path / 'checkpoints', use_async=False)
  ckpt.save(3, STATE, {'step_in_stage': 2}, force=True)  # as a test might
  ckpt.wait()
  assert not (ckpt.directory / '3' / 'data').exists()
  assert _resumed(ckpt).get_state() == {'next_index': 0}
  ckpt.close()

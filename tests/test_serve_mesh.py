"""`flmjax serve --mesh`: sessions over data, the LM's heads and KV cache over tensor. Four live
sessions on (data=2, tensor=4) get exactly what the single-device pipeline replays offline."""

import numpy as np
import pytest
from serve_harness import check_crosstalk, sessions_by_slot

import flmjax
from flmjax import sharding as shd
from flmjax.decode import SamplingConfig
from flmjax.serve.pipeline import serving_mesh
from flmjax.serve.server import Server

GREEDY = SamplingConfig(greedy=True)


@pytest.mark.slow
def test_four_sessions_on_a_mesh_equal_the_single_device_replay(
  serve_pipeline, tiny_dir, golden_dir
):
  from flmjax.codec import load_mimi
  from flmjax.serve.pipeline import FramePipeline

  mesh = serving_mesh('data=2,tensor=4', 4)
  model = flmjax.load_official(str(tiny_dir), dtype='float32', mesh=mesh)
  pipeline = FramePipeline(
    model, load_mimi(str(golden_dir / 'mimi_small')), 4, sampling=GREEDY, max_len=256, mesh=mesh
  )
  # Sessions over data; the 4 query heads over tensor (the tiny model's 2 KV heads cannot split
  # 4 ways, so its KV cache is kept whole on each tensor shard).
  assert pipeline.lm['cache']['k'].sharding.spec[1] == 'data'
  assert pipeline.decoder.params['backbone']['q'][...].sharding.spec[2] == 'tensor'
  tail = pipeline.user_stream['encoder']['downsample']['tail']
  assert tail.sharding.spec[0] in ('data', ('data', 'fsdp'))
  server = Server(pipeline, sampling=GREEDY)
  frames = {0: 18, 1: 12, 2: 22, 3: 15}
  by_slot = sessions_by_slot(server, frames, first_seed=30)
  assert sorted(by_slot) == [0, 1, 2, 3]
  # The reference is the single-device pipeline (the session-scoped fixture), replayed offline.
  assert serve_pipeline.mesh is None
  found = check_crosstalk(serve_pipeline, model.cfg, by_slot)
  assert found == {slot: [] for slot in by_slot}, found
  assert all(c.frames_received == c.frames_sent - 1 for c in by_slot.values())
  # Live sampling updates and restarts keep the rows where the compiled frame takes them.
  every = np.ones((4,), bool)
  pipeline.start(every)
  pipeline.set_sampling(every, SamplingConfig(greedy=True, temp_text=0.5))
  assert pipeline.step(np.zeros((4, pipeline.frame_size), np.float32)).pcm.shape == (4, 1920)


def test_mesh_flag_errors_are_named():
  with pytest.raises(ValueError, match=r"`mesh` 'data=2,model=4': expected comma-separated"):
    serving_mesh('data=2,model=4', 4)
  with pytest.raises(ValueError, match=r'`slots` 3: the sessions shard over data x fsdp = 2'):
    serving_mesh('data=2,tensor=2', 3)
  with pytest.raises(ValueError, match=r'needs 16 devices; 8 are visible'):
    serving_mesh('data=4,tensor=4', 4)
  assert shd.parse_axes('data=2, tensor=4') == {'data': 2, 'tensor': 4}
  assert serving_mesh(None, 4) is None
  mesh = serving_mesh('tensor=8', 5)
  assert (
    dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 8} and np.prod(mesh.devices.shape) == 8
  )

"""`flmjax serve --kv-pages`: a server on a paged KV pool too small for its sessions. A session
that needs a page of the full pool ends cleanly (counted in flmjax_kv_pool_full), the others
run on, and every reply equals the contiguous pipeline's offline replay."""

import asyncio

import pytest
from probe import error_line
from serve_harness import check_crosstalk, converse, running, voice

from flmjax.decode import SamplingConfig
from flmjax.serve.server import Server

GREEDY = SamplingConfig(greedy=True)


@pytest.mark.slow
def test_a_full_pool_ends_only_the_session_that_needs_a_page(
  serve_pipeline, tiny_model, golden_dir
):
  from flmjax.codec import load_mimi
  from flmjax.serve.pipeline import FramePipeline

  # 3 pages of 8 positions: the long session holds all 3 by frame 16 (the short one's page is
  # back by then) and at frame 24 needs a fourth.
  paged = FramePipeline(
    tiny_model,
    load_mimi(str(golden_dir / 'mimi_small')),
    4,
    sampling=GREEDY,
    max_len=64,  # 8 pages a session at most: warmup compiles the spans 1, 2, 4, 8
    kv_pages=3,
    page_size=8,
  )
  paged.warmup()
  assert paged.free_pages() == 3
  server = Server(paged, sampling=GREEDY)

  async def scenario():
    async with running(server) as addr:
      url = f'ws://{addr}/api/chat'
      return await asyncio.gather(
        converse(url, voice(60, 40), pace=False), converse(url, voice(61, 6), pace=False)
      )

  long, short = asyncio.run(scenario())
  ended = {s.sid: s for s in server.finished}
  assert ended[long.session].reason == 'the KV page pool is full: the session cannot grow'
  assert long.close_code == 1000 and ended[long.session].frames_in == 24
  assert long.frames_received == 23 and short.frames_received == 5
  metrics = server.frame_loop.metrics
  assert metrics.pool_full._value.get() == 1
  assert paged.free_pages() == 3  # every page back once both left
  convs = {ended[c.session].slot: c for c in (long, short)}
  found = check_crosstalk(
    serve_pipeline, tiny_model.cfg, convs, frames={ended[long.session].slot: 23}
  )
  assert found == {slot: [] for slot in convs}, found


@pytest.mark.parametrize(
  'argv,message',
  [
    (['--kv-dtype', 'int8'], '--kv-dtype int8 needs --kv-pages N'),
    (['--kv-pages', '8', '--max-len', '100'], '--max-len 100 must be a multiple of --page-size'),
    (['--kv-pages', '0'], '--kv-pages 0 must be >= 1'),
    (['--kv-pages', '8', '--page-size', '0'], '--page-size 0 must be >= 1'),
  ],
)
def test_paged_flags_are_checked_before_anything_loads(capsys, tmp_path, argv, message):
  # Through the dispatcher, as a user runs it: the checkpoint and codec do not exist, so a flag
  # error is only seen if it comes before anything loads.
  line = error_line(
    capsys, 'serve', '--checkpoint', tmp_path / 'x', '--mimi', tmp_path / 'y', '--port', '0', *argv
  )
  assert message in line, line

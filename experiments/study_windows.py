"""Issue 29, arm 3's cheap checks (experiments/RESULTS.md): what a training window holds.

  .venv/bin/python experiments/study_windows.py [--corpus RUN_DIR/corpus] [--cost]

1. Cue in window: of the answer-number targets that a training window trains (windows drawn as
   flmjax.data.pipeline draws them), the share whose question's "after"/"before" lies in the same
   window, per timing (training and the held-out variants) and window size.
2. With --corpus (a built synthetic corpus): the columns of every single-speaker grid under each
   stage-1 layout, and how many exceed a 32-frame window.
3. With --cost: CPU seconds per tiny train step (batch 32, random grids) at windows 64, 32, 24.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flmjax.config import ModelConfig
from flmjax.data.synthetic import ToySpeech, duplex_sample
from flmjax.data.timing import HELDOUT_VARIANTS, TRAINING

CFG = ModelConfig.tiny()
LEAD = 2  # the default's monologue leads its speech by 2 frames (flmjax/configs/tiny_dual.py)


def cue_pairs(track) -> list[tuple[int, int]]:
  """(cue column, answer-number text column) per answered question of one conversation."""
  cue, pairs = None, []
  for seg, words in zip(track.segments, track.words):
    if seg['speaker'] == 'user':
      cue = next((f for w, f in words if w in ('after', 'before')), cue)
    elif cue is not None and len(words) >= 3:  # "it is X": X is the third word
      listen_col = cue + CFG.grid_offsets[1 + CFG.num_codebooks]  # the user's semantic channel
      pairs.append((listen_col, words[2][1] - LEAD + CFG.grid_offsets[0]))
      cue = None
  return pairs


def cue_in_window(timing, window: int, n: int, draws: int = 20, seed: int = 0) -> dict:
  rng, speech = np.random.default_rng(seed), ToySpeech()
  trained = with_cue = 0
  distances = []
  for _ in range(n):
    track = duplex_sample(speech, rng, timing=timing)
    size, pairs = track.frames + max(CFG.grid_offsets), cue_pairs(track)
    distances += [a - c for c, a in pairs]
    for _ in range(draws):  # as pipeline._WindowedGrid: targets [lo, hi) of a window at start
      if size <= window:
        start, lo, hi = 0, 1, size
      else:
        raw = int(rng.integers(2 - window, size - 1))
        start = min(max(raw, 0), size - window)
        lo, hi = max(raw, start) + 1, min(raw, start) + window
      for c, a in pairs:
        if lo <= a < hi:
          trained += 1
          with_cue += start <= c < start + window
  d = np.array(distances)
  return {
    'with_cue': round(with_cue / trained, 4),
    'distance_p50_p90_max': [float(np.median(d)), float(np.percentile(d, 90)), int(d.max())],
  }


def stage1_columns(corpus: str) -> None:
  import grain

  from flmjax.data import pipeline as pl
  from flmjax.data import records as rec_lib
  from flmjax.data.grid import LossWeights

  path = f'{corpus}/prepared/tts_asr'
  source = grain.sources.ArrayRecordDataSource(rec_lib.record_files(path))
  for layout, offset, stream in (('lead', LEAD, 'speak'), ('trail', 0, 'listen')):
    spec = pl.SourceSpec(path, layout=layout, offset_frames=offset, speech_stream=stream)
    cols = np.array(
      [
        pl.record_grid(
          CFG, rec_lib.decode_record(source[i]), spec, layout, LossWeights(), 32
        ).tokens.shape[1]
        for i in range(len(source))
      ]
    )
    print(
      f'stage 1 {layout}: {len(cols)} grids, columns median {np.median(cols):.0f}, '
      f'max {cols.max()}, over 32: {(cols > 32).sum()}'
    )


def step_cost(windows=(64, 32, 24), steps: int = 15) -> None:
  import jax
  import jax.numpy as jnp

  from flmjax import sharding as shd
  from flmjax.train import data as data_lib
  from flmjax.train import state as st
  from flmjax.train import step as sp
  from flmjax.train.config import OptimConfig, StageConfig, TrainConfig

  mesh = shd.make_mesh(1, 1, 1)
  for window in windows:
    tc = TrainConfig(
      model=CFG,
      stages=(StageConfig('a', 1, random_data=True),),
      run_dir='',
      window=window,
      batch_size=32,
      compute_dtype='float32',
      optim=OptimConfig(weight_decay=0.01),
    )
    spec = st.state_spec(tc, mesh)
    state, fn = st.init_state(spec, tc), sp.jit_train_step(spec, tc, mesh)
    batch = data_lib.to_global(next(data_lib.make_stage_loader(tc, 0)), sp.batch_shardings(mesh))
    state, m = fn(state, batch, jnp.float32(1e-3))  # compiles
    jax.block_until_ready(m)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
      state, m = fn(state, batch, jnp.float32(1e-3))
    jax.block_until_ready(m)
    cpu, wall = (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps
    print(f'window {window}, batch 32: {cpu:.3f} s CPU, {wall:.3f} s wall per step')


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--corpus', help='a built synthetic corpus (a run directory/corpus)')
  ap.add_argument('--cost', action='store_true', help='time the train step at three windows')
  ap.add_argument('--conversations', type=int, default=600)
  args = ap.parse_args()
  timings = {'training': TRAINING, **{k: t for k, (t, _) in HELDOUT_VARIANTS.items()}}
  for window in (64, 128):
    for name, timing in timings.items():
      n = args.conversations if name == 'training' else args.conversations // 3
      print(f'window {window}, {name}: {cue_in_window(timing, window, n)}')
  if args.corpus:
    stage1_columns(args.corpus)
  if args.cost:
    step_cost()


if __name__ == '__main__':
  main()

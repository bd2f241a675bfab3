"""The embedded default: the tiny model on the synthetic corpus with the dual schedule.

Stage 1 (asr_tts): single-speaker data two ways at once: TTS-style (speech on the speak stream,
its text leading it) and ASR-style (speech on the listen stream, its text trailing it).
Stage 2 (duplex): conversations, the model on speak, the user on listen, the monologue leading.
`flmjax main` runs it on a 2-core CPU in a few minutes. The corpus is large enough (4000
conversations) that the model cannot memorise it, and the batch of 32 gives the duplex stage
enough answered questions to learn all 40 of them: with batch 16 or fewer steps the held-out
answers stay mostly wrong (experiments/RESULTS.md).

`recipe` takes every knob; `get_config` is the default, the recipe with DEFAULT's settings
(issue 29's arms 8, 14, 15 and 16 in experiments/RESULTS.md: stage 1 in 32-frame windows, 1000
duplex steps at peak lr 8e-3, and mixed into the duplex stage, conversations where the model
stops one frame after a barge-in and conversations with every question split by a pause right
after its direction word).
"""

import dataclasses
import os

from flmjax.config import ModelConfig
from flmjax.data.corpus import SyntheticCorpus
from flmjax.data.grid import LossWeights
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import OptimConfig, TrainConfig
from flmjax.train.schedule import SINGLE_SPEAKER_LAYOUTS, dual_stages

LEAD_FRAMES = 2  # the monologue starts 2 frames (160 ms) before its speech
TRAIL_FRAMES = 0
LAYOUTS = SINGLE_SPEAKER_LAYOUTS  # single-speaker data: TTS-style (lead) and ASR-style (trail)


# Issue 29's arm 8 (H): the default from arm 8 to arm 14, and the control of arms 9-14.
ARM8 = dict(asr_tts_window=32, steps=(100, 900), barge_in=0.5, barge_in_split='duplex_quick_stop')
# Arm 14's U: the default from arm 14 to arm 16, and the control of arms 15-16.
ARM14 = {**ARM8, 'steps': (100, 1000), 'peak_lr': (3e-3, 6e-3)}
# The default's settings of `recipe`: arm 16's Y, U with conversations whose questions are split
# right after their direction word, at a higher duplex peak learning rate. Each setting was
# chosen by a rule fixed before its runs (experiments/RESULTS.md).
DEFAULT = {**ARM14, 'direction_pause': 1.0, 'peak_lr': (3e-3, 8e-3)}


def get_config(run_dir: str, **kw) -> TrainConfig:
  """The embedded default: `recipe` with DEFAULT's settings; keyword arguments (`flmjax main
  --steps`, a config built on this one) override them."""
  return recipe(run_dir, **{**DEFAULT, **kw})


def recipe(
  run_dir: str,
  *,
  steps=(100, 650),
  layouts=LAYOUTS,
  mix: float = 0.1,
  no_trail: bool = False,
  seed: int = 0,
  window: int = 64,
  batch_size: int = 32,
  duplex_text_weight: float = 1.0,
  asr_tts_window: int | None = None,
  peak_lr: tuple[float, float] = (3e-3, 4e-3),
  qa: float = 0.0,
  barge_in: float = 0.0,
  barge_in_split: str = 'duplex_barge_in',
  whole_turns: bool = False,
  direction_pause: float = 0.0,
  fresh: int = 1,
  rope_theta: float | None = None,
  num_layers: int | None = None,
) -> TrainConfig:
  """layouts: the single-speaker layouts trained (the ablation's arms: both, lead only = the
  paper's no-trail, trail only); mix: the weight of each of them in the duplex stage, beside the
  conversations' 1.0, so that stage 2 keeps stage 1's skills (0: conversations only).
  window, batch_size: frames per training window and windows per step (both stages);
  duplex_text_weight: scales the duplex stage's text-stream loss (words and WAIT alike, so their
  balance, which decides when the model speaks, is kept) against the audio's;
  asr_tts_window: stage 1's own window (None: `window`; the default corpus's single-speaker
  grids are at most 29 columns, so 32 holds each whole); peak_lr: (stage 1, duplex);
  qa: question-and-answer monologues (the corpus's 'tts_asr_qa') as more single-speaker data, at
  `qa` times the weight of each single-speaker source in both stages (0: none); barge_in: the
  weight in the duplex stage of the extra conversations `barge_in_split` (0: none):
  'duplex_barge_in' (barge-in-rich), 'duplex_quick_stop' (the same, the model silent one frame
  after each barge-in starts) or 'duplex_paused_quick_stop' (that, with every question split by a
  pause); whole_turns: the duplex stage's conversation windows train no target before their first
  whole user turn (SourceSpec.whole_turns); direction_pause: the weight in the duplex stage of
  4000 conversations with every question split by a pause right after its 'after' or 'before'
  ('duplex_direction_pause'; 0: none); fresh: the duplex stage draws from `fresh` times as many
  conversations of each kind, in the same proportions ('duplex_more' holds the added ones like
  'duplex'), so that it sees each about 4.7 / fresh times at 1000 steps; rope_theta: the tiny
  model's RoPE base (None: the preset's 1e6, Qwen2.5's); num_layers: the tiny model's backbone
  layers (None: the preset's 2)."""
  if no_trail:
    layouts = ('lead',)
  # Built when training starts (run_dir/corpus), not here: loading a config has no side effects.
  if fresh < 1:
    raise ValueError(f'tiny_dual.recipe: fresh={fresh}; give a whole multiple of the corpus, >= 1')
  # the extra conversation splits: split -> (conversations, weight beside 'duplex''s 1.0)
  talks = {
    barge_in_split: (2000 * fresh, barge_in * fresh),
    'duplex_direction_pause': (4000 * fresh, direction_pause * fresh),
    'duplex_more': (4000 * (fresh - 1), fresh - 1.0),
  }
  talks = {name: n_weight for name, n_weight in talks.items() if n_weight[1] > 0}
  extras = (('tts_asr_qa', 1000),) * (qa > 0) + tuple((name, n) for name, (n, _) in talks.items())
  corpus = SyntheticCorpus(
    os.path.join(run_dir, 'corpus'), num_tts_asr=2000, num_duplex=4000, extras=extras
  )
  stages = dual_stages(
    corpus.split('tts_asr'),
    corpus.split('duplex'),
    steps=steps,
    peak_lr=peak_lr,
    warmup_steps=(min(20, steps[0]), min(10, steps[1])),  # a short run (main --steps) warms up less
    end_lr_ratio=(0.1, 0.05),
    lead_frames=LEAD_FRAMES,
    trail_frames=TRAIL_FRAMES,
    layouts=layouts,
    mix=mix * fresh,  # weights are relative: every source but 'duplex' grows with `fresh`
  )
  if duplex_text_weight != 1.0:
    base = LossWeights()
    weights = dataclasses.replace(
      base, text=base.text * duplex_text_weight, wait=base.wait * duplex_text_weight
    )
    stages = (stages[0], dataclasses.replace(stages[1], loss_weights=weights))
  add = lambda stage, more: dataclasses.replace(stage, sources=stage.sources + tuple(more))
  if qa > 0:  # each single-speaker source again, on the monologues, at `qa` times its weight
    single, monologues = corpus.split('tts_asr'), corpus.split('tts_asr_qa')
    again = lambda src: dataclasses.replace(src, path=monologues, weight=src.weight * qa)
    stages = tuple(add(s, [again(src) for src in s.sources if src.path == single]) for s in stages)
  talk = lambda split, weight: SourceSpec(
    corpus.split(split), layout='lead', offset_frames=LEAD_FRAMES, weight=weight
  )
  stages = (stages[0], add(stages[1], [talk(name, w) for name, (_, w) in talks.items()]))
  if whole_turns:
    paths = {corpus.split(name) for name in ('duplex', *talks)}
    turns = lambda src: dataclasses.replace(src, whole_turns=True) if src.path in paths else src
    stages = (
      stages[0],
      dataclasses.replace(stages[1], sources=tuple(map(turns, stages[1].sources))),
    )
  if asr_tts_window is not None:
    stages = (dataclasses.replace(stages[0], window=asr_tts_window),) + stages[1:]
  heldout = SourceSpec(corpus.split('heldout_duplex'), layout='lead', offset_frames=LEAD_FRAMES)
  model = {
    k: v for k, v in (('rope_theta', rope_theta), ('num_layers', num_layers)) if v is not None
  }
  return TrainConfig(
    model=ModelConfig.tiny(**model),
    stages=stages,
    run_dir=run_dir,
    window=window,
    batch_size=batch_size,
    seed=seed,
    compute_dtype='float32',
    optim=OptimConfig(weight_decay=0.01, clip_norm=1.0),
    checkpoint_every=100,
    keep_checkpoints=2,
    log_every=10,
    eval_sources=(heldout,),
    eval_batches=8,
    tokenizer=corpus.tokenizer,
    corpus=corpus,
  )

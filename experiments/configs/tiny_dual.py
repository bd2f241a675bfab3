"""The embedded default: the tiny model on the synthetic corpus with the dual schedule.

Stage 1 (asr_tts): single-speaker data two ways at once: TTS-style (speech on the speak stream,
its text leading it) and ASR-style (speech on the listen stream, its text trailing it).
Stage 2 (duplex): conversations, the model on speak, the user on listen, the monologue leading.
`flmjax main` runs it on a 2-core CPU in a few minutes. The corpus is large enough (4000
conversations) that the model cannot memorise it, and the batch of 32 gives the duplex stage
enough answered questions to learn all 40 of them: with batch 16 or fewer steps the held-out
answers stay mostly wrong (experiments/RESULTS.md).
"""
import os

from flmjax.config import ModelConfig
from flmjax.data.grid import LossWeights
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import OptimConfig, StageConfig, TrainConfig
from flmjax.train.corpus import ensure_synthetic_corpus

LEAD_FRAMES = 2  # the monologue starts 2 frames (160 ms) before its speech
TRAIL_FRAMES = 0


def get_config(run_dir: str, *, steps=(100, 450), no_trail: bool = False,
               seed: int = 0) -> TrainConfig:
  corpus = ensure_synthetic_corpus(os.path.join(run_dir, 'corpus'), num_tts_asr=2000,
                                   num_duplex=4000)
  tts = SourceSpec(corpus['tts_asr'], weight=1.0, layout='lead', offset_frames=LEAD_FRAMES,
                   speech_stream='speak')
  asr = SourceSpec(corpus['tts_asr'], weight=1.0, layout='trail', offset_frames=TRAIL_FRAMES,
                   speech_stream='listen')
  duplex = SourceSpec(corpus['duplex'], layout='lead', offset_frames=LEAD_FRAMES)
  stages = (
      StageConfig('asr_tts', steps=steps[0], sources=(tts,) if no_trail else (tts, asr),
                  loss_weights=LossWeights(), peak_lr=3e-3, warmup_steps=20, end_lr_ratio=0.1),
      StageConfig('duplex', steps=steps[1], sources=(duplex,), loss_weights=LossWeights(),
                  peak_lr=4e-3, warmup_steps=10, end_lr_ratio=0.05),
  )
  heldout = SourceSpec(corpus['heldout_duplex'], layout='lead', offset_frames=LEAD_FRAMES)
  return TrainConfig(
      model=ModelConfig.tiny(), stages=stages, run_dir=run_dir, window=64, batch_size=32,
      seed=seed, compute_dtype='float32', optim=OptimConfig(weight_decay=0.01, clip_norm=1.0),
      checkpoint_every=100, keep_checkpoints=2, log_every=10, eval_sources=(heldout,),
      eval_batches=8, tokenizer=corpus['tokenizer'])

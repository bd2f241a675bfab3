"""The `small` preset (~100M parameters) on the synthetic corpus with the dual schedule.

For machines with more compute than the CI CPU: bf16 compute, remat of everything but matmul
outputs, 4-way gradient accumulation. The stages mirror tiny_dual.py.
"""
import os

from flmjax.config import ModelConfig
from flmjax.data.grid import LossWeights
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import MeshConfig, OptimConfig, StageConfig, TrainConfig
from flmjax.train.corpus import ensure_synthetic_corpus


def get_config(run_dir: str) -> TrainConfig:
  corpus = ensure_synthetic_corpus(os.path.join(run_dir, 'corpus'), num_tts_asr=2000,
                                   num_duplex=2000, num_heldout=128)
  tts = SourceSpec(corpus['tts_asr'], layout='lead', offset_frames=2, speech_stream='speak')
  asr = SourceSpec(corpus['tts_asr'], layout='trail', offset_frames=0, speech_stream='listen')
  duplex = SourceSpec(corpus['duplex'], layout='lead', offset_frames=2)
  stages = (
      StageConfig('asr_tts', steps=2000, sources=(tts, asr), loss_weights=LossWeights(),
                  peak_lr=1e-3, warmup_steps=100, end_lr_ratio=0.1),
      StageConfig('duplex', steps=2000, sources=(duplex,), loss_weights=LossWeights(),
                  peak_lr=5e-4, warmup_steps=50, end_lr_ratio=0.05),
  )
  return TrainConfig(
      model=ModelConfig.small(), stages=stages, run_dir=run_dir, window=128, batch_size=64,
      grad_accum=4, seed=0, compute_dtype='bfloat16', remat='dots',
      optim=OptimConfig(weight_decay=0.1, clip_norm=1.0), mesh=MeshConfig(data=-1),
      checkpoint_every=500, keep_checkpoints=3, log_every=20,
      eval_sources=(SourceSpec(corpus['heldout_duplex'], layout='lead', offset_frames=2),))

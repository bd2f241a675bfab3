"""The `small` preset (~100M parameters) on the synthetic corpus with the dual schedule.

For machines with more compute than the CI CPU: bf16 compute, remat of everything but matmul
outputs, 4-way gradient accumulation. The stages mirror tiny_dual.py.
"""

import os

from flmjax.config import ModelConfig
from flmjax.data.corpus import SyntheticCorpus
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import MeshConfig, OptimConfig, TrainConfig
from flmjax.train.schedule import dual_stages


def get_config(run_dir: str) -> TrainConfig:
  corpus = SyntheticCorpus(
    os.path.join(run_dir, 'corpus'), num_tts_asr=2000, num_duplex=2000, num_heldout=128
  )  # built when training starts
  stages = dual_stages(
    corpus.split('tts_asr'),
    corpus.split('duplex'),
    steps=(2000, 2000),
    peak_lr=(1e-3, 5e-4),
    warmup_steps=(100, 50),
    end_lr_ratio=(0.1, 0.05),
  )
  return TrainConfig(
    model=ModelConfig.small(),
    stages=stages,
    run_dir=run_dir,
    window=128,
    batch_size=64,
    grad_accum=4,
    seed=0,
    compute_dtype='bfloat16',
    remat='dots',
    optim=OptimConfig(weight_decay=0.1, clip_norm=1.0),
    mesh=MeshConfig(data=-1),
    checkpoint_every=500,
    keep_checkpoints=3,
    log_every=20,
    eval_sources=(SourceSpec(corpus.split('heldout_duplex'), layout='lead', offset_frames=2),),
    tokenizer=corpus.tokenizer,
    corpus=corpus,
  )

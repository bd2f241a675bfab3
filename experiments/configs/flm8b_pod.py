"""flm_8b on a TPU pod: the dual schedule, fine-tuned from the official checkpoint.

Window 4096 frames (5.5 min of conversation), global batch 64, bf16 compute over fp32 master
weights, full remat, FSDP over 64 chips (data takes any further chips). Sized for v5p:4x4x4
(see the AOT table in experiments/RESULTS.md); on v5e:16x16 use fsdp=256 and batch 256:
  flmjax aot --config experiments/configs/flm8b_pod.py --topology v5p:4x4x4
  flmjax train --config experiments/configs/flm8b_pod.py --run-dir gs://BUCKET/runs/flm8b
Data: FLMJAX_DATA names a folder of `flmjax data prepare` outputs (tts_asr, duplex,
heldout_duplex); FLMJAX_INIT_FROM the official checkpoint directory (config.json + weights).
The learning rates are fine-tuning rates for an already trained model: tune them for your data.
"""

import os

from flmjax.config import ModelConfig
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import MeshConfig, OptimConfig, TrainConfig
from flmjax.train.schedule import dual_stages

DATA = os.environ.get('FLMJAX_DATA', 'data/prepared')
INIT_FROM = os.environ.get('FLMJAX_INIT_FROM', 'checkpoints/FLM-Audio')
LEAD_FRAMES = 2  # the monologue leads its speech by 160 ms, as in tiny_dual.py


def get_config(run_dir: str) -> TrainConfig:
  data = lambda name: os.path.join(DATA, name)
  stages = dual_stages(
    data('tts_asr'),
    data('duplex'),
    steps=(10000, 5000),
    peak_lr=(2e-5, 1e-5),
    warmup_steps=(500, 200),
    end_lr_ratio=(0.1, 0.1),
    lead_frames=LEAD_FRAMES,
  )
  return TrainConfig(
    model=ModelConfig.flm_8b(),
    stages=stages,
    run_dir=run_dir,
    window=4096,
    batch_size=64,
    grad_accum=1,
    seed=0,
    compute_dtype='bfloat16',
    remat='full',
    optim=OptimConfig(weight_decay=0.1, clip_norm=1.0),
    mesh=MeshConfig(data=-1, fsdp=64),
    checkpoint_every=500,
    keep_checkpoints=3,
    log_every=10,
    init_from=INIT_FROM,
    eval_sources=(SourceSpec(data('heldout_duplex'), layout='lead', offset_frames=LEAD_FRAMES),),
    progress_bar=False,
  )

"""LoRA demo (issue 18): teach the trained tiny default model a new answer style on CPU.

The embedded default (experiments/configs/tiny_dual.py, `flmjax main`) answers "what comes after
nine" with "it is ten". Here LoRA adapters (rank 16, alpha 32, attn + mlp, float32 base) learn
to answer "that is ten" from 2000 new-style conversations, 150 steps of batch 32; the base is
frozen. Design fixed before the run:
- new-style held-out: 64 conversations of a corpus seed the training never saw, streamed
  greedily through the decoder (flmjax.eval.duplex.evaluate_duplex) with the base and with the
  LoRA run merged at load (flmjax.checkpoint.restore.restore_model);
- a turn is in the new style when its sentence starts with "that is"; right when it equals the
  reference ("that is X"); target: >= 80% of held-out turns in the new style;
- the base checkpoint's files (sha256) and the frozen base the run trained on (bit for bit)
  before and after.

  .venv/bin/python experiments/lora_demo.py --base-run runs/tiny_dual [--out runs/lora_demo]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np

from flmjax.platforms import cpu_unless_accelerator

STYLE, OLD = 'that is', 'it is'


def style_corpus(out: str, tokenizer: str, seed: int, num: int) -> dict[str, str]:
  """New-style duplex conversations (raw manifest + prepared with the base run's tokenizer)."""
  from flmjax.codec.toy import ToyCodec
  from flmjax.data import synthetic
  from flmjax.data.prepare import prepare
  from flmjax.data.tokenizer import load_tokenizer

  rng, speech = np.random.default_rng(seed), synthetic.ToySpeech()
  tracks = [synthetic.duplex_sample(speech, rng, answer_style=STYLE) for _ in range(num)]
  raw = os.path.join(out, 'raw')
  manifest = synthetic._write(raw, f'style_{seed}', 'duplex', tracks, False, ToyCodec())
  prepared = os.path.join(out, f'prepared_{seed}')
  if not os.path.isdir(prepared):
    prepare(manifest, prepared, load_tokenizer(tokenizer), progress=False)
  return {'manifest': manifest, 'prepared': prepared}


def digest(path: str) -> str:
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    with open(os.path.join(path, name), 'rb') as f:
      h.update(name.encode() + f.read())
  return h.hexdigest()


def turns(report: dict) -> dict:
  said = [(t['said'], t['reference']) for c in report['conversations'] for t in c['turns']]
  n = len(said)
  return {
    'turns': n,
    'new_style': sum(s.startswith(STYLE + ' ') for s, _ in said) / n,
    'old_style': sum(s.startswith(OLD + ' ') for s, _ in said) / n,
    'right': sum(s == r for s, r in said) / n,
    'right_number': sum(s.split()[-1:] == r.split()[-1:] for s, r in said) / n,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--base-run', required=True, help='the trained tiny default run directory')
  ap.add_argument('--out', default='runs/lora_demo')
  ap.add_argument('--steps', type=int, default=150)
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args()
  cpu_unless_accelerator()
  import jax
  from flax import nnx

  import flmjax
  from flmjax.checkpoint.restore import restore_model
  from flmjax.config import ModelConfig
  from flmjax.data.pipeline import SourceSpec
  from flmjax.data.tokenizer import load_tokenizer
  from flmjax.eval.duplex import evaluate_duplex
  from flmjax.model.lora import LoraConfig
  from flmjax.train.config import OptimConfig, StageConfig, TrainConfig
  from flmjax.train.loop import train

  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  base_model, meta = restore_model(args.base_run)
  tokenizer = meta['train_config']['tokenizer']
  base_dir = os.path.join(out, 'base')
  if not os.path.isdir(base_dir):
    flmjax.save_official(base_model, base_dir, dtype='float32')
  before = digest(base_dir)
  data = style_corpus(os.path.join(out, 'corpus'), tokenizer, seed=1000, num=2000)
  heldout = style_corpus(os.path.join(out, 'corpus'), tokenizer, seed=2000, num=64)
  lora = LoraConfig(rank=16, alpha=32.0, targets=('attn', 'mlp'), base_dtype='float32')
  stage = StageConfig(
    'style',
    steps=args.steps,
    peak_lr=3e-3,
    warmup_steps=10,
    end_lr_ratio=0.1,
    sources=(SourceSpec(data['prepared'], layout='lead', offset_frames=2),),
  )
  tc = TrainConfig(
    model=ModelConfig.tiny(),
    stages=(stage,),
    run_dir=os.path.join(out, 'run'),
    window=64,
    batch_size=32,
    seed=args.seed,
    compute_dtype='float32',
    optim=OptimConfig(weight_decay=0.0),
    checkpoint_every=args.steps,
    keep_checkpoints=1,
    log_every=10,
    init_from=base_dir,
    tokenizer=tokenizer,
    progress_bar=False,
    lora=lora,
  )
  t0 = time.perf_counter()
  result = train(tc)
  train_s = time.perf_counter() - t0
  frozen = flmjax.load_official(base_dir, dtype='float32', tensor_parallel=1)
  same = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
      jax.tree.leaves(jax.device_get(result['base'])),
      jax.tree.leaves(nnx.to_pure_dict(nnx.state(frozen))),
    )
  )
  tok = load_tokenizer(tokenizer)
  merged, _ = restore_model(tc.run_dir)
  rows = {}
  for name, model in (('base', frozen), ('base + LoRA (merged)', merged)):
    report = evaluate_duplex(model, heldout['manifest'], tok, limit=64)
    rows[name] = turns(report)
    rows[name]['turn_taking'] = {
      k: v for k, v in report['turn_taking'].items() if not k.endswith('_all')
    }
    rows[name]['example'] = [t['said'] for t in report['conversations'][0]['turns'][:3]]
  summary = {
    'steps': args.steps,
    'train_s': round(train_s, 1),
    'seed': args.seed,
    'lora': str(lora),
    'trainable_params': int(sum(x.size for x in jax.tree.leaves(result['state'].params))),
    'base_params': int(sum(x.size for x in jax.tree.leaves(result['base']))),
    'base_files_unchanged': digest(base_dir) == before,
    'base_bit_identical': bool(same),
    'heldout': rows,
  }
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=str)
  print(json.dumps(summary, indent=2, default=str))
  print(
    '\n| model | turns | new style ("that is X") | old style ("it is X") | exactly right | '
    'right number | pause takeover | interrupt stop |'
  )
  print('|---|---|---|---|---|---|---|---|')
  rate = lambda x: '-' if x is None else f'{x:.3f}'
  for name, r in rows.items():
    tt = r['turn_taking']
    print(
      f'| {name} | {r["turns"]} | {100 * r["new_style"]:.1f}% | {100 * r["old_style"]:.1f}% '
      f'| {100 * r["right"]:.1f}% | {100 * r["right_number"]:.1f}% '
      f'| {rate(tt["pause_takeover_rate"])} | {rate(tt["interrupt_stop_rate"])} |'
    )


if __name__ == '__main__':
  main()

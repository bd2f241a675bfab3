"""The paper's dual-training ablation in miniature, measured with flmjax.eval.

Design (fixed and committed before any arm ran):
- Arms: the single-speaker layouts trained in stage 1, and mixed into the duplex stage:
  dual = lead + trail (TTS- and ASR-style); no_trail = lead only (the paper's ablation);
  trail_only = trail only.
- Seeds 0-4 per arm (the seed sets the initialisation and the data order; one corpus for all runs,
  experiments/configs/tiny_dual.py's). Runs go dual and no_trail seed by seed first, then
  trail_only (so that the paper's comparison is complete first if time runs out). (This order
  was changed from "seed by seed, three arms in turn" after the first launch crashed in its
  first run, before any result existed.)
- Budget per run (sized so that 15 runs fit in about an hour on the loaded 2-core box): the tiny
  model, batch 16, window 64, float32; stage 1 = 100 steps; duplex stage = 60 steps with each of the
  arm's single-speaker layouts mixed in at weight 0.15 beside the conversations' 1.0. Stage 1 is
  long relative to the duplex stage (the default runs 100 + 500 at batch 32): the duplex stage is
  cut short where transfer can show, in how soon it learns to understand the user.
- Evaluation at duplex-stage steps 0 (= the end of stage 1), 20, 40, 60:
  - teacher-forced held-out text accuracy (non-WAIT tokens) on duplex (lead), ASR (listen, trail)
    and TTS (speak, lead): 4 batches of 16 windows each, the same windows for every run;
  - the first 16 held-out conversations streamed greedily: exact answers (turn accuracy),
    takeover rate, response latency (median ms), pause takeover rate, interrupt stop rate.
- Statistics: per arm, the mean and its 95% t-interval over the seeds (t with n - 1 degrees of
  freedom); per comparison (dual - no_trail, dual - trail_only), the paired difference by seed
  with its 95% t-interval.
- Decision rule ("the paper's drop appears"), on two primary endpoints:
  (1) held-out ASR text accuracy at the end of the run;
  (2) held-out duplex teacher-forced text accuracy, averaged over duplex steps 20, 40, 60 (the
      transfer: how fast the duplex stage learns).
  On an endpoint the drop appears when the 95% interval of dual - no_trail lies above 0, is
  reversed when it lies below 0, and is not shown at this scale otherwise. Every other metric is
  reported with its interval, not decided on.

  .venv/bin/python experiments/ablation_no_trail.py [--root runs/ablation] [--seeds 0,1,2,3,4]

Results go to ROOT/ablation.json (a finished run is not trained again) and the tables and curves
to stdout and ROOT/curves.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

from flmjax.platforms import cpu_unless_accelerator

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'tiny_dual.py')
ARMS = {'dual': ('lead', 'trail'), 'no_trail': ('lead',), 'trail_only': ('trail',)}
STEPS = (100, 60)  # stage 1, duplex stage
POINTS = (0, 20, 40, 60)  # duplex-stage steps evaluated
BATCH, MIX, CONVERSATIONS, TF_BATCHES = 16, 0.15, 16, 4
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
STREAMED = (
  'turn_accuracy',
  'takeover_rate',
  'response_latency_ms',
  'pause_takeover_rate',
  'interrupt_stop_rate',
)


def load_config(run_dir: str, corpus_root: str, arm: str, seed: int):
  spec = importlib.util.spec_from_file_location('tiny_dual', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tc = module.recipe(corpus_root, steps=STEPS, layouts=ARMS[arm], mix=MIX, seed=seed)
  return tc.replace(
    run_dir=run_dir,
    batch_size=BATCH,
    eval_sources=(),
    progress_bar=False,
    checkpoint_every=POINTS[1],
    keep_checkpoints=len(POINTS) + 1,
  )


class Judge:
  """The held-out evaluation of every run, compiled once per process."""

  def __init__(self, tc):
    from flmjax.data.pipeline import SourceSpec
    from flmjax.data.tokenizer import load_tokenizer
    from flmjax.decode.decoder import StreamingDecoder
    from flmjax.decode.sampling import SamplingConfig
    from flmjax.eval.stream import read_conversations
    from flmjax.eval.teacher_forced import TeacherForced
    from flmjax.model.flm import create

    corpus = tc.corpus
    lead = tc.stages[1].sources[0].offset_frames
    single = corpus.split('heldout_tts_asr')
    sets = {
      'duplex': (SourceSpec(corpus.split('heldout_duplex'), offset_frames=lead),),
      'ASR': (SourceSpec(single, layout='trail', speech_stream='listen'),),
      'TTS': (SourceSpec(single, layout='lead', offset_frames=lead),),
    }
    self.tf = TeacherForced(tc.model, sets, batch_size=BATCH, num_batches=TF_BATCHES)
    self.tokenizer = load_tokenizer(corpus.tokenizer)
    self.convs = read_conversations(
      corpus.manifest('heldout_duplex'), tc.model.num_codebooks, limit=CONVERSATIONS
    )
    greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
    self.decoder = StreamingDecoder(
      create(tc.model.replace(dtype='float32'), 0), greedy, max_len=tc.model.max_position_embeddings
    )

  def __call__(self, model) -> dict:
    from flmjax.eval.duplex import evaluate_duplex

    row = {f'{k} acc_text': m['acc_text'] for k, m in self.tf(model).items()}
    report = evaluate_duplex(
      model, '', self.tokenizer, conversations=self.convs, decoder=self.decoder
    )
    row['turn_accuracy'] = report['turn_accuracy']
    row.update({k: report['turn_taking'][k] for k in STREAMED[1:]})
    return row


def run(arm: str, seed: int, root: str, judge_box: list) -> dict:
  from flmjax.checkpoint.restore import restore_model
  from flmjax.train.loop import train

  tc = load_config(os.path.join(root, f'{arm}_seed{seed}'), root, arm, seed)
  t0 = time.time()
  train(tc, log=lambda *a, **k: None)
  out = {'train_s': time.time() - t0, 'curve': {}}
  if not judge_box:
    judge_box.append(Judge(tc))
  for point in POINTS:
    model, _ = restore_model(tc.run_dir, STEPS[0] + point)
    out['curve'][point] = judge_box[0](model)
  out['eval_s'] = time.time() - t0 - out['train_s']
  return out


def interval(values) -> tuple[float, float]:
  """(mean, half-width of the 95% t-interval); the half-width is nan for one value."""
  v = np.asarray([x for x in values if x is not None], float)
  if v.size < 2:
    return (float(v.mean()) if v.size else float('nan')), float('nan')
  return float(v.mean()), T975[v.size - 1] * float(v.std(ddof=1)) / np.sqrt(v.size)


def endpoints(row: dict) -> dict:
  """The metrics of one run that the tables report."""
  first, last = row['curve'][str(POINTS[0])], row['curve'][str(POINTS[-1])]
  out = {}
  for k in ('ASR acc_text', 'TTS acc_text', 'duplex acc_text') + STREAMED:
    out[f'end of stage 1: {k}'] = first[k]
    out[f'end: {k}'] = last[k]
  out['duplex acc_text, mean over duplex steps ' + ','.join(map(str, POINTS[1:]))] = float(
    np.mean([row['curve'][str(p)]['duplex acc_text'] for p in POINTS[1:]])
  )
  return out


def fmt(mean: float, half: float) -> str:
  return f'{mean:.3f} ± {half:.3f}' if np.isfinite(half) else f'{mean:.3f}'


def summarize(rows: dict, seeds: list[int], root: str) -> str:
  """Each arm over its seeds that finished; paired differences over the seeds both arms have."""
  done = {a: [s for s in seeds if f'{a}_seed{s}' in rows] for a in ARMS}
  arms = [a for a in ARMS if done[a]]
  ends = {a: {s: endpoints(rows[f'{a}_seed{s}']) for s in done[a]} for a in arms}
  lines = [
    '; '.join(f'{a}: seeds {done[a]}' for a in arms)
    + '. Mean ± 95% t-interval half-width (paired: over the seeds both arms ran)',
    '',
    '| held-out metric | ' + ' | '.join(arms) + ' | dual − no_trail (paired) | '
    'dual − trail_only (paired) |',
    '|---' * (len(arms) + 3) + '|',
  ]
  for metric in next(iter(ends[arms[0]].values())) if arms else {}:
    cells = [fmt(*interval([e[metric] for e in ends[a].values()])) for a in arms]
    for other in ('no_trail', 'trail_only'):
      both = [s for s in seeds if s in ends.get('dual', {}) and s in ends.get(other, {})]
      if both:
        pairs = [(ends['dual'][s][metric], ends[other][s][metric]) for s in both]
        cells.append(fmt(*interval([d - o if None not in (d, o) else None for d, o in pairs])))
      else:
        cells.append('-')
    lines.append(f'| {metric} | ' + ' | '.join(cells) + ' |')
  lines += [
    '',
    'curves over duplex-stage steps (mean over seeds):',
    '',
    '| arm | metric | ' + ' | '.join(f'step {p}' for p in POINTS) + ' |',
    '|---|---|' + '---|' * len(POINTS),
  ]
  for a in arms:
    for k in (
      'duplex acc_text',
      'ASR acc_text',
      'TTS acc_text',
      'turn_accuracy',
      'interrupt_stop_rate',
      'pause_takeover_rate',
    ):
      means = [
        interval([rows[f'{a}_seed{s}']['curve'][str(p)][k] for s in done[a]])[0] for p in POINTS
      ]
      lines.append(f'| {a} | {k} | ' + ' | '.join(f'{m:.3f}' for m in means) + ' |')
  plot_curves(rows, done, os.path.join(root, 'curves.png'))
  return '\n'.join(lines)


def plot_curves(rows: dict, done: dict, path: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  keys = (
    'duplex acc_text',
    'ASR acc_text',
    'TTS acc_text',
    'turn_accuracy',
    'interrupt_stop_rate',
    'pause_takeover_rate',
  )
  fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
  for ax, k in zip(axes, keys):
    for a, seeds in done.items():
      if not seeds:
        continue
      stats = [interval([rows[f'{a}_seed{s}']['curve'][str(p)][k] for s in seeds]) for p in POINTS]
      mean, half = (np.array(x) for x in zip(*stats))
      ax.errorbar(POINTS, mean, yerr=np.nan_to_num(half), label=a, capsize=3)
    ax.set_title(k, fontsize=9)
    ax.set_xlabel('duplex-stage step')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--root', default=os.path.join('runs', 'ablation'))
  ap.add_argument('--seeds', default='0,1,2,3,4', help='comma-separated training seeds')
  ap.add_argument('--summarize', action='store_true', help='only print the tables of the runs done')
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  os.makedirs(args.root, exist_ok=True)
  path = os.path.join(args.root, 'ablation.json')
  rows = json.load(open(path)) if os.path.exists(path) else {}
  judge: list = []
  order = [(a, s) for s in seeds for a in ('dual', 'no_trail')] + [('trail_only', s) for s in seeds]
  for arm, seed in order if not args.summarize else ():
    key = f'{arm}_seed{seed}'
    if key in rows:
      continue
    rows[key] = json.loads(json.dumps(run(arm, seed, args.root, judge)))  # str keys
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)
    print(
      f'{key}: trained in {rows[key]["train_s"]:.0f} s, evaluated in '
      f'{rows[key]["eval_s"]:.0f} s; end: ' + json.dumps(rows[key]['curve'][str(POINTS[-1])]),
      flush=True,
    )
  print(summarize(rows, seeds, args.root))


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()

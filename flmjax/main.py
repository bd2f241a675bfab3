"""`flmjax main`: the embedded default, end to end.

Trains experiments/configs/tiny_dual.py (synthetic corpus, ASR+TTS stage then duplex stage) and
shows what the trained model does: teacher-forced accuracies per stream on held-out samples,
next to the untrained model's, then full-duplex streaming chat on held-out conversations.
`--parity` instead checks the forward against the golden fixtures.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from flmjax.cli import ArgumentParser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, 'experiments', 'configs', 'tiny_dual.py')


def parity(golden_dir: str) -> dict[str, float]:
  import flmjax
  model = flmjax.load_official(os.path.join(golden_dir, 'flm_tiny'), dtype='float32')
  ref = np.load(os.path.join(golden_dir, 'flm_tiny', 'forward.npz'))
  out = model(ref['text'], ref['speak'], ref['listen'], ref['depth_tokens'][..., :-1])
  report = {}
  for name, ours in (('hidden', out.hidden), ('text_logits', out.text_logits),
                     ('depth_logits', out.depth_logits)):
    ours = np.asarray(ours)
    report[name] = float(np.linalg.norm(ours - ref[name]) / np.linalg.norm(ref[name]))
    if name != 'hidden':
      report[name + '_argmax'] = float((ours.argmax(-1) == ref[name].argmax(-1)).mean())
  return report


def heldout_sets(tc) -> dict[str, tuple]:
  """Held-out evaluation sets: each is how one task lays out the held-out samples."""
  from flmjax.data.pipeline import SourceSpec
  corpus = os.path.join(tc.run_dir, 'corpus', 'prepared')
  sets = {'duplex (lead)': tc.eval_sources}
  tts_asr = os.path.join(corpus, 'heldout_tts_asr')
  if os.path.isdir(tts_asr):
    sets['ASR (listen, trail)'] = (SourceSpec(tts_asr, layout='trail', speech_stream='listen'),)
    lead = tc.eval_sources[0].offset_frames if tc.eval_sources else 0
    sets['TTS (speak, lead)'] = (SourceSpec(tts_asr, layout='lead', offset_frames=lead),)
  return sets


def show(tc, result, sets: dict) -> dict:
  """Teacher-forced metrics on held-out data, trained vs untrained."""
  from flmjax.train.evaluate import evaluate
  from flmjax.train.state import init_state
  spec, mesh = result['spec'], result['mesh']
  untrained = init_state(spec, tc).params
  table = {}
  keys = (('acc_text', 'text acc (non-WAIT)'), ('wait_rate_pred', 'WAIT rate pred'),
          ('wait_rate_target', 'WAIT rate target'), ('acc_semantic', 'semantic acc'),
          ('acc_acoustic', 'acoustic acc'), ('loss', 'loss'))
  for name, sources in sets.items():
    trained = evaluate(tc, spec, mesh, result['state'].params, sources)
    base = evaluate(tc, spec, mesh, untrained, sources)
    table[name] = {'trained': trained, 'untrained': base}
    print(f'\nheld-out {name}: teacher-forced, {int(trained["targets_text"])} text targets')
    print(f'  {"":22s} {"untrained":>10s} {"trained":>10s}')
    for k, label in keys:
      if k in ('acc_semantic', 'acc_acoustic') and not trained['targets_semantic']:
        print(f'  {label:22s} {"-":>10s} {"-":>10s}   (no speak targets)')
        continue
      print(f'  {label:22s} {base[k]:10.4f} {trained[k]:10.4f}')
  return table


def chat(tc, result, limit: int = 32) -> dict:
  """Streams held-out conversations through the decoder; prints transcripts and turn accuracy."""
  from flax import nnx
  from flmjax.data.tokenizer import load_tokenizer
  from flmjax.decode.heldout import chat_heldout
  corpus = os.path.join(tc.run_dir, 'corpus')
  with open(os.path.join(corpus, 'corpus.json')) as f:
    tokenizer = load_tokenizer(json.load(f)['paths']['tokenizer'])
  model = nnx.merge(result['spec'].graphdef, result['state'].params)
  report = chat_heldout(model, os.path.join(corpus, 'raw', 'heldout_duplex.jsonl'), tokenizer,
                        limit=limit)
  print(f'\nfull-duplex chat, greedy, {limit} held-out conversations streamed as one batch:')
  for conv in report['conversations'][:3]:
    print(f'  [{conv["id"]}]')
    for i, question in enumerate(conv['user']):
      said = conv['said'][i] if i < len(conv['said']) else '(nothing)'
      answer = conv['reference'][i] if i < len(conv['reference']) else ''
      print(f'    user: {question:28s} model: {said:16s} (reference: {answer})')
  print(f'  turns answered exactly right: {report["right"]}/{report["turns"]} '
        f'({100 * report["turn_accuracy"]:.0f}%)')
  return report


def main(argv: list[str] | None = None) -> int:
  ap = ArgumentParser(prog='flmjax main')
  ap.add_argument('--config', default=DEFAULT_CONFIG)
  ap.add_argument('--run_dir', default=os.path.join('runs', 'tiny_dual'))
  ap.add_argument('--parity', action='store_true', help='only check golden forward parity')
  ap.add_argument('--golden', default=os.path.join(os.path.dirname(REPO), 'shared', 'golden'))
  args = ap.parse_args(argv)
  if args.parity:
    report = parity(args.golden)
    for k, v in report.items():
      print(f'{k:22s} {v:.3e}' if 'argmax' not in k else f'{k:22s} {v:.4f}')
    ok = all(v < 1e-5 for k, v in report.items() if 'argmax' not in k)
    print('parity with the official PyTorch forward:', 'OK' if ok else 'FAILED')
    return 0 if ok else 1
  from flmjax.train.config import load_config_file
  from flmjax.train.loop import train
  t0 = time.time()
  tc = load_config_file(args.config, args.run_dir)
  heldout = heldout_sets(tc)
  tc = tc.replace(eval_sources=())  # evaluated below, next to the untrained model
  print(f'training {args.config} in {os.path.abspath(tc.run_dir)}: '
        + ', '.join(f'{s.name} {s.steps} steps' for s in tc.stages))
  result = train(tc)
  train_s = time.time() - t0
  table = show(tc, result, heldout)
  table['chat'] = chat(tc, result)
  with open(os.path.join(tc.run_dir, 'heldout.json'), 'w') as f:
    json.dump(table, f, indent=2)
  print(f'\ntrained in {train_s:.0f}s (total {time.time() - t0:.0f}s); loss curves: '
        f'{os.path.join(tc.run_dir, "loss_*.png")}; TensorBoard: '
        f'{os.path.join(tc.run_dir, "tensorboard")}; checkpoints: '
        f'{os.path.join(tc.run_dir, "checkpoints")} (export with `flmjax export`)')
  return 0

"""The evaluation report: report.json, report.md (one markdown table) and a PNG timeline per
conversation (user and model activity, the turn-taking events, the model's text on top)."""

from __future__ import annotations

import json
import os

import numpy as np

FRAME_MS = 80

ROWS = (  # (label, key in the report, format)
  ('exact answers (turns right)', 'turn_accuracy', '{:.3f}'),
  ('takeover rate (turn ends answered)', 'takeover_rate', '{:.3f}'),
  ('response latency, median ms', 'response_latency_ms', '{:.0f}'),
  ('pause takeover rate (lower is better)', 'pause_takeover_rate', '{:.3f}'),
  ('interrupt stop rate', 'interrupt_stop_rate', '{:.3f}'),
  ('interrupt stop latency, median ms', 'interrupt_stop_latency_ms', '{:.0f}'),
)


def _cell(value, fmt: str) -> str:
  return '-' if value is None else fmt.format(value)


def markdown(report: dict) -> str:
  """One table: turn-taking beside content accuracy (streamed), then teacher-forced accuracies."""
  tt, counts = report['turn_taking'], report['turn_taking']['counts']
  flat = dict(tt, turn_accuracy=report['turn_accuracy'])
  lines = [
    f'held-out conversations: {len(report["conversations"])}; events: '
    + ', '.join(f'{v} {k}' for k, v in counts.items())
    + f'; answer turns: {report["right"]}/{report["turns"]} right',
    '',
    '| metric | value |',
    '|---|---|',
  ]
  lines += [f'| {label} | {_cell(flat[key], fmt)} |' for label, key, fmt in ROWS]
  for name, m in report.get('teacher_forced', {}).items():
    lines.append(f'| teacher-forced {name}: text acc | {m["acc_text"]:.3f} |')
  return '\n'.join(lines) + '\n'


def plot_timeline(conv: dict, tokenizer, cfg, path: str) -> None:
  """One conversation: user and model activity rows, events shaded, model text above."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from flmjax.eval.duplex import split_on_wait

  user, model = np.asarray(conv['user_active'], bool), np.asarray(conv['model_active'], bool)
  frames = len(model)
  fig, ax = plt.subplots(figsize=(max(6.0, frames * 0.12), 3.0))
  t = np.arange(frames) * FRAME_MS / 1000
  width = FRAME_MS / 1000
  ax.bar(t[user], 0.8, width, bottom=1.1, align='edge', color='tab:blue', label='user speaks')
  ax.bar(t[model], 0.8, width, bottom=0.1, align='edge', color='tab:orange', label='model speaks')
  shade = {'pause': 'tab:gray', 'interrupt': 'tab:red', 'turn_end': 'tab:green'}
  for kind, start, end in conv['events']:
    if kind == 'turn_end':
      ax.axvline(start * width, color=shade[kind], lw=1)
    else:
      ax.axvspan(start * width, end * width, color=shade[kind], alpha=0.2)
  # the model's monologue: each sentence at the frame where it starts
  ids, f = conv['text_ids'], 0
  specials = (cfg.text_wait_id, cfg.text_bos_id, cfg.text_eos_id)
  while f < len(ids):
    if ids[f] in specials:
      f += 1
      continue
    run = f
    while run < len(ids) and ids[run] not in specials:
      run += 1
    sentence = [i for s in split_on_wait(ids[f:run], cfg) for i in s if i < tokenizer.vocab_size]
    ax.text(f * width, 2.05, tokenizer.decode(sentence), fontsize=7, rotation=20)
    f = run
  ax.set_ylim(0, 2.9)
  ax.set_xlim(0, frames * width)
  ax.set_yticks([0.5, 1.5], ['model', 'user'])
  ax.set_xlabel('seconds (green: user turn ends, gray: pauses, red: barge-ins)')
  ax.set_title(conv['id'], fontsize=9)
  fig.subplots_adjust(left=0.08, right=0.99, bottom=0.2, top=0.85)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_report(report: dict, out_dir: str, tokenizer, cfg) -> list[str]:
  """Writes report.json, report.md and timelines/<id>.png; returns the paths."""
  os.makedirs(os.path.join(out_dir, 'timelines'), exist_ok=True)
  paths = [os.path.join(out_dir, 'report.json'), os.path.join(out_dir, 'report.md')]
  with open(paths[0], 'w') as f:
    json.dump(report, f, indent=1)
  with open(paths[1], 'w') as f:
    f.write(markdown(report))
  for conv in report['conversations']:
    safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in conv['id'])
    paths.append(os.path.join(out_dir, 'timelines', f'{safe}.png'))
    plot_timeline(conv, tokenizer, cfg, paths[-1])
  return paths

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
  ('response latency, mean ms', 'response_latency_ms_mean', '{:.0f}'),
  ('response latency, p10 ms', 'response_latency_ms_p10', '{:.0f}'),
  ('response latency, p90 ms', 'response_latency_ms_p90', '{:.0f}'),
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
  fdb = report.get('turn_taking_fdb')
  if fdb is not None and tt.get('rules') != 'fdb':
    lines.append(f'| takeover rate, FDB rules | {_cell(fdb["takeover_rate"], "{:.3f}")} |')
    lines.append(
      f'| pause takeover rate, FDB rules | {_cell(fdb["pause_takeover_rate"], "{:.3f}")} |'
    )
    mean = _cell(fdb['response_latency_ms_mean'], '{:.0f}')
    lines.append(f'| response latency, FDB rules, mean ms | {mean} |')
  if tt.get('rules') == 'fdb':
    lines.insert(1, "(takeovers and pauses under Full-Duplex-Bench's rules)")
  for name, m in report.get('teacher_forced', {}).items():
    lines.append(f'| teacher-forced {name}: text acc | {m["acc_text"]:.3f} |')
  return '\n'.join(lines) + '\n'


def wilson(hits: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
  """The 95% Wilson score interval of a rate of `hits` in `n` (None for n = 0)."""
  if not n:
    return None
  p = hits / n
  mid, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))


def _rate_cell(rate, n: int) -> str:
  if rate is None:
    return '-'
  low, high = wilson(rate * n, n)
  return f'{rate:.3f} [{low:.2f}, {high:.2f}]'


def sets_markdown(reports: dict[str, dict]) -> str:
  """One row per held-out set: exact answers and turn-taking, rates with 95% Wilson intervals,
  latencies as p10/p50/p90 ms, and Full-Duplex-Bench's takeover rule beside ours."""
  lines = [
    '| held-out set | exact answers | takeover | pause takeover | interrupt stop '
    '| latency p10/p50/p90 ms | stop latency ms | FDB takeover | FDB pause takeover '
    '| FDB latency mean ms |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  lat = lambda m: '/'.join(
    _cell(m[k], '{:.0f}')
    for k in ('response_latency_ms_p10', 'response_latency_ms', 'response_latency_ms_p90')
  )
  for name, r in reports.items():
    tt, fdb, n = r['turn_taking'], r['turn_taking_fdb'], r['turn_taking']['counts']
    lines.append(
      f'| {name} ({len(r["conversations"])}) | {_rate_cell(r["turn_accuracy"], r["turns"])} '
      f'({r["right"]}/{r["turns"]}) | {_rate_cell(tt["takeover_rate"], n["turn_end"])} '
      f'| {_rate_cell(tt["pause_takeover_rate"], n["pause"])} '
      f'| {_rate_cell(tt["interrupt_stop_rate"], n["interrupt"])} | {lat(tt)} '
      f'| {_cell(tt["interrupt_stop_latency_ms"], "{:.0f}")} '
      f'| {_rate_cell(fdb["takeover_rate"], n["turn_end"])} '
      f'| {_rate_cell(fdb["pause_takeover_rate"], n["pause"])} '
      f'| {_cell(fdb["response_latency_ms_mean"], "{:.0f}")} |'
    )
  return '\n'.join(lines) + '\n'


def _title(conv: dict) -> str:
  """The conversation's id and metrics: exact answers, takeover, pauses, barge-ins, latency."""
  m, turns = conv['turn_taking'], conv['turns']
  rate = lambda key: _cell(m[key], '{:.2f}')
  return (
    f'{conv["id"]}: answers {sum(t["right"] for t in turns)}/{len(turns)} right; '
    f'takeover {rate("takeover_rate")}, pause takeover {rate("pause_takeover_rate")}, '
    f'interrupt stop {rate("interrupt_stop_rate")}, latency median '
    f'{_cell(m["response_latency_ms"], "{:.0f}")} ms'
  )


def plot_timeline(conv: dict, tokenizer, cfg, path: str) -> None:
  """One conversation: user and model activity rows, events shaded, the model's text above;
  under each answer turn the reference answer with a check or a cross (right or wrong); the
  conversation's metrics in the title."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from flmjax.eval.duplex import split_on_wait

  user, model = np.asarray(conv['user_active'], bool), np.asarray(conv['model_active'], bool)
  frames = len(model)
  fig, ax = plt.subplots(figsize=(max(8.0, frames * 0.12), 3.4))
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
  for turn in conv['turns']:  # the reference under the model's row, marked right or wrong
    mark, color = ('\u2713', 'tab:green') if turn['right'] else ('\u2717', 'tab:red')
    ax.text(
      turn['frame'] * width, -0.35, f'{mark} ref: {turn["reference"]}', fontsize=8, color=color
    )
  ax.set_ylim(-0.6, 2.9)
  ax.set_xlim(0, frames * width)
  ax.set_yticks([0.5, 1.5], ['model', 'user'])
  ax.set_xlabel('seconds (green: user turn ends, gray: pauses, red: barge-ins)')
  ax.set_title(_title(conv), fontsize=8)
  fig.subplots_adjust(left=0.08, right=0.99, bottom=0.2, top=0.88)
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

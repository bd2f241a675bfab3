"""Observability: progress bar (plain progress lines when stdout is not a terminal), TensorBoard
scalars, metrics.jsonl, per-stage summaries and one loss-curve PNG per stream."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from etils import epath

from flmjax.train.config import TrainConfig

DATA_COUNTS = ('pushed_frames', 'cut_tokens', 'extended_frames')  # the loader's, per step
SUMMARY = 'summary.json'
SUMMARY_KEYS = (
  'loss',
  'loss_text',
  'acc_text',
  'wait_rate_pred',
  'wait_rate_target',
  'loss_semantic',
  'acc_semantic',
  'loss_acoustic',
  'acc_acoustic',
)


def history(run_dir: str) -> list[dict]:
  """Logged metrics of a run, one record per step (the last write wins after a resume)."""
  path = epath.Path(run_dir) / 'metrics.jsonl'
  by_step = {}
  if path.exists():
    with path.open() as f:
      for line in f:
        if line.strip():
          rec = json.loads(line)
          by_step[rec['step']] = rec
  return [by_step[k] for k in sorted(by_step)]


class Observer:
  """Writes every step's metrics; only the primary host is `enabled`."""

  def __init__(self, tc: TrainConfig, *, enabled: bool, initial_step: int, total: int):
    self.tc, self.enabled = tc, enabled
    self.steps_this_run = 0
    self.stage_summaries: list[dict] = []
    self._stage_records: list[dict] = []
    self._data_totals = dict.fromkeys(DATA_COUNTS, 0.0)
    self._stage_t0 = time.perf_counter()
    self._bar = self._tb = self._jsonl = None
    if not enabled:
      return
    # In CI or under `| tee` a carriage-return bar makes an unreadable log: print a plain line
    # every 5% of the run instead.
    self._lines = tc.progress_bar and not sys.stdout.isatty()
    self._line_every, self._total = max(1, total // 20), total
    self._last_line = (time.perf_counter(), initial_step)
    if tc.progress_bar and not self._lines:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=initial_step, unit='step', dynamic_ncols=True)
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.fspath(epath.Path(tc.run_dir) / 'tensorboard'))
    except (ImportError, OSError, NotImplementedError):
      # TensorBoard is optional (and tensorboardX cannot write to every filesystem epath can);
      # metrics.jsonl always has everything.
      self._tb = None
    self._jsonl = (epath.Path(tc.run_dir) / 'metrics.jsonl').open('a')

  def begin_stage(self, stage: int, start_step: int) -> None:
    self._stage_records, self._stage_t0 = [], time.perf_counter()
    self._data_totals = dict.fromkeys(DATA_COUNTS, 0.0)
    if self._bar is not None:
      self._bar.set_description(self.tc.stages[stage].name)

  def record(self, step: int, stage: int, metrics: dict) -> None:
    self.steps_this_run += 1
    rec = {'step': step, 'stage': self.tc.stages[stage].name, **metrics}
    self._stage_records.append(rec)
    for k in DATA_COUNTS:
      self._data_totals[k] += metrics.get(k, 0.0)
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(rec) + '\n')
    if step % self.tc.log_every == 0:
      self._jsonl.flush()
      if self._tb is not None:
        for k, v in metrics.items():
          self._tb.add_scalar(f'train/{k}', v, step)
        for k, v in self._data_totals.items():  # running totals of the stage
          self._tb.add_scalar(f'data/{self.tc.stages[stage].name}/{k}', v, step)
    if self._lines and (step % self._line_every == 0 or step == self._total):
      self._progress_line(step, stage, metrics)
    if self._bar is not None:
      self._bar.update(1)
      self._bar.set_postfix(
        loss=f'{metrics["loss"]:.3f}',
        text=f'{metrics["acc_text"]:.2f}',
        sem=f'{metrics["acc_semantic"]:.2f}',
        refresh=False,
      )

  def _progress_line(self, step: int, stage: int, metrics: dict) -> None:
    t0, step0 = self._last_line
    now = time.perf_counter()
    rate = (step - step0) / max(now - t0, 1e-9)
    self._last_line = (now, step)
    left = (self._total - step) / max(rate, 1e-9)
    print(
      f'step {step}/{self._total} ({self.tc.stages[stage].name}): loss {metrics["loss"]:.3f}, '
      f'text acc {metrics["acc_text"]:.2f}, semantic acc {metrics["acc_semantic"]:.2f}; '
      f'{rate:.2f} steps/s, {left:.0f}s left',
      flush=True,
    )

  def end_stage(self, stage: int, log, finished: bool) -> None:
    recs = self._stage_records
    if not recs:
      return
    n = max(1, min(10, len(recs) // 5))  # average a few steps: single steps are noisy
    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))
    summary = {
      'stage': self.tc.stages[stage].name,
      'steps_this_run': len(recs),
      'finished': finished,
      'seconds': time.perf_counter() - self._stage_t0,
      'frames_per_s': mean(recs[n:] or recs, 'frames_per_s'),
      'first': {k: mean(recs[:n], k) for k in SUMMARY_KEYS},
      'last': {k: mean(recs[-n:], k) for k in SUMMARY_KEYS},
      'data': dict(self._data_totals),
    }
    self.stage_summaries.append(summary)
    if self.enabled:
      f, l = summary['first'], summary['last']
      lines = [
        f'stage {summary["stage"]!r}: {len(recs)} steps in {summary["seconds"]:.1f}s '
        f'({summary["frames_per_s"]:.0f} frames/s){"" if finished else " (stopped)"}'
      ]
      for k in SUMMARY_KEYS:
        lines.append(f'  {k:18s} {f[k]:8.4f} -> {l[k]:8.4f}')
      d = summary['data']
      lines.append(
        f'  monologue: {d["pushed_frames"]:.0f} frames pushed, {d["cut_tokens"]:.0f} '
        f'tokens cut, {d["extended_frames"]:.0f} frames of extension past the audio'
      )
      (self._bar.write if self._bar is not None else log)('\n'.join(lines))
    if self._tb is not None:
      self._tb.add_text('stage_summary', json.dumps(summary), recs[-1]['step'])

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def write_plots(run_dir: str, tc: TrainConfig) -> list[str]:
  """One PNG per stream (loss_{total,text,semantic,acoustic}.png) with stage boundaries."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  recs = history(run_dir)
  if not recs:
    return []
  steps = np.array([r['step'] for r in recs])
  bounds = np.cumsum([s.steps for s in tc.stages])[:-1]
  paths = []
  for key, title in (
    ('loss', 'total'),
    ('loss_text', 'text'),
    ('loss_semantic', 'semantic'),
    ('loss_acoustic', 'acoustic'),
  ):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r[key] for r in recs], lw=1)
    for b in bounds:
      ax.axvline(b, color='gray', ls='--', lw=0.8)
    ax.set_xlabel('step')
    ax.set_ylabel('weighted cross-entropy')
    ax.set_title(f'{title} loss (stages: {", ".join(s.name for s in tc.stages)})', fontsize=9)
    fig.tight_layout()
    path = epath.Path(run_dir) / f'loss_{title}.png'
    with path.open('wb') as f:
      fig.savefig(f, dpi=90, format='png')
    plt.close(fig)
    paths.append(os.fspath(path))
  return paths


def write_summary(run_dir: str, out: dict) -> str:
  """run_dir/summary.json: the latest step and eval, and every stage summary of every run so far
  (a resumed run appends its own, so nothing of an earlier run is lost). Written atomically."""
  path = epath.Path(run_dir) / SUMMARY
  stages = []
  if path.is_file():
    try:
      stages = list(json.loads(path.read_text()).get('stages', []))
    except (OSError, ValueError, AttributeError):
      path.replace(path.with_name(SUMMARY + '.unreadable'))  # kept, never overwritten silently
  runs = max((s.get('run', 0) for s in stages), default=0)
  stages += [{**s, 'run': runs + 1} for s in out['stages']]
  summary = {'global_step': out['global_step'], 'stages': stages, 'eval': out['eval']}
  tmp = path.with_name(SUMMARY + '.tmp')
  tmp.write_text(json.dumps(summary, indent=2))
  tmp.replace(path)
  return os.fspath(path)

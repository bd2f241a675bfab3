"""Held-out answers teacher-forced, by where a pause split the question (issue 29): is the
"after word 3" case a decoding problem or a learning one? The model reads each conversation's
reference streams whole (flmjax.model.flm.FLMAudio, no decoder); an answer ("it is N") counts as
right when the text head's argmax at N's column is N. Questions are sorted as answer_errors.py
sorts the streamed ones.

  python experiments/teacher_forced_answers.py RUN_DIR [RUN_DIR ...]
      [--splits heldout_duplex,duplex] [--limit 300]

A run directory holds checkpoints/ and corpus/ (prepared/<split> records, raw/<split>.jsonl).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from answer_errors import SPLITS, question_split, rate_cell  # noqa: E402

from flmjax.configs.tiny_dual import LEAD_FRAMES  # noqa: E402
from flmjax.data import records as rec_lib  # noqa: E402
from flmjax.data.grid import LossWeights  # noqa: E402
from flmjax.data.pipeline import SourceSpec, record_grid  # noqa: E402
from flmjax.decode.session import load_model  # noqa: E402

ANSWER_TOKENS = 3  # "it is N": a shorter answer was cut by a barge-in and has no number


def text_head(model):
  """The model's whole-sequence text logits, compiled once per sequence length."""
  return jax.jit(lambda text, speak, listen: model(text, speak, listen).text_logits)


def run_counts(run_dir: str, model, text_logits, split: str, limit: int) -> collections.Counter:
  """(split kind, right) -> answers of one run's model on one of its prepared splits."""
  cfg = model.cfg
  prepared = os.path.join(run_dir, 'corpus', 'prepared', split)
  with open(os.path.join(run_dir, 'corpus', 'raw', f'{split}.jsonl')) as f:
    segments = {c['id']: c['segments'] for c in map(json.loads, f)}
  spec = SourceSpec(prepared, layout='lead', offset_frames=LEAD_FRAMES)
  counts = collections.Counter()
  for record in rec_lib.read_all(prepared)[:limit]:
    grid = record_grid(cfg, record, spec, 'lead', LossWeights())
    tokens = grid.tokens  # [17, T]; text frame f sits at column f + 1
    k = cfg.num_codebooks
    speak, listen = tokens[1 : 1 + k].T[None], tokens[1 + k :].T[None]  # [1, T, 8] each
    logits = text_logits(tokens[None, 0], speak, listen)  # [1, T, V]
    predicted = np.asarray(logits[0].argmax(-1))  # [T]: column j predicts column j + 1's token
    answers = [s for s in record.sentences if s[0] == 'model']
    for placed, (_, start, _, _) in zip(grid.placed, answers):
      if len(placed.tokens) < ANSWER_TOKENS:
        continue
      kind = question_split(segments[record.id], start)
      number = placed.frame + len(placed.tokens) - 1  # the number's frame
      counts[kind, bool(predicted[number] == placed.tokens[-1])] += 1
  return counts


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+')
  parser.add_argument('--splits', default='heldout_duplex,duplex')
  parser.add_argument('--limit', type=int, default=300, help='conversations per split')
  args = parser.parse_args(argv)
  print('| run | split | ' + ' | '.join(SPLITS) + ' |')
  print('|---|---|' + '---|' * len(SPLITS))
  for run in args.runs:
    model = load_model(run)  # once a run: its splits share the model and the compiled forward
    text_logits = text_head(model)
    for split in args.splits.split(','):
      counts = run_counts(run, model, text_logits, split, args.limit)
      cells = [rate_cell(counts, (kind,)) for kind in SPLITS]
      print(f'| {os.path.basename(run.rstrip("/"))} | {split} | ' + ' | '.join(cells) + ' |')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

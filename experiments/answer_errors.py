"""Where the held-out answers go wrong (issue 29, arm 10): each answer turn of a `flmjax main`
run's held-out chat, by where a pause split its question: not split, or split after its first,
second or third word ("what | comes after nine", "what comes | after nine", "what comes after |
nine"). Per arm and set: right / turns over the arm's runs, and the rate. Then the "after word 3"
turns by the question before them: none (the conversation's first), the same direction or the
other, as right / turns.

  python experiments/answer_errors.py H=/runs/H-s3,/runs/H-s4 L=/runs/L-s3,...

A run directory holds heldout.json and corpus/raw/<set>.jsonl (the question segments).
"""

from __future__ import annotations

import collections
import json
import os
import sys

from flmjax.codec.base import FRAME_RATE

SETS = ('heldout_duplex', 'heldout_long_pauses', 'heldout_slow', 'heldout_other')
SPLITS = ('whole', 'after word 1', 'after word 2', 'after word 3')


def question_split(segments: list[dict], turn_end: int) -> str:
  """The question that ends at frame `turn_end`: its user segments back to the one that starts
  with 'what'; a pause after word k of the question is 'after word k'."""
  user = [s for s in segments if s['speaker'] == 'user' and s['end'] * FRAME_RATE <= turn_end + 0.5]
  parts = []
  for s in reversed(user):
    parts.insert(0, s)
    if s['text'].startswith('what'):
      break
  return 'whole' if len(parts) == 1 else f'after word {len(parts[0]["text"].split())}'


def questions(segments: list[dict]) -> list[tuple[int, str]]:
  """(end frame, direction word) of each whole question of a conversation, in order."""
  out, words = [], []
  for s in segments:
    if s['speaker'] != 'user':
      continue
    words = s['text'].split() if s['text'].startswith('what') else words + s['text'].split()
    if len(words) == 4:  # "what comes after|before N"
      out.append((round(s['end'] * FRAME_RATE), words[2]))
  return out


def run_counts(run_dir: str) -> collections.Counter:
  """(set, split, right) -> turns of one run; and ('previous', kind, right) -> "after word 3"
  turns, by whether the question before it asked the same direction ('same', 'other') or there
  was none ('first')."""
  with open(os.path.join(run_dir, 'heldout.json')) as f:
    chat = json.load(f)['chat']
  counts = collections.Counter()
  for name in SETS:
    with open(os.path.join(run_dir, 'corpus', 'raw', f'{name}.jsonl')) as f:
      segments = {c['id']: c['segments'] for c in map(json.loads, f)}
    for conv in chat[name]['conversations']:
      asked = questions(segments[conv['id']])
      for turn in conv['turns']:
        split = question_split(segments[conv['id']], turn['frame'])
        counts[name, split, turn['right']] += 1
        before = [d for end, d in asked if end <= turn['frame']]
        if split == 'after word 3' and before:
          kind = 'first' if len(before) == 1 else ('same' if before[-2] == before[-1] else 'other')
          counts['previous', kind, turn['right']] += 1
  return counts


def rate_cell(counts: collections.Counter, key: tuple) -> str:
  """'right/n (rate)' of counts[(*key, True)] over both outcomes, or '-' where there are none."""
  right, n = counts[(*key, True)], counts[(*key, True)] + counts[(*key, False)]
  return f'{right}/{n} ({right / n:.2f})' if n else '-'


def table(arms: dict[str, list[str]]) -> str:
  lines = [
    '| arm | set | ' + ' | '.join(SPLITS) + ' |',
    '|---|---|' + '---|' * len(SPLITS),
  ]
  for arm, runs in arms.items():
    counts = sum((run_counts(r) for r in runs), collections.Counter())
    for name in SETS:
      cells = []
      for split in SPLITS:
        cells.append(rate_cell(counts, (name, split)))
      lines.append(f'| {arm} | {name} | ' + ' | '.join(cells) + ' |')
    previous = ', '.join(
      f'{kind} {counts["previous", kind, True]}/'
      f'{counts["previous", kind, True] + counts["previous", kind, False]}'
      for kind in ('first', 'same', 'other')
    )
    lines.append(f'| {arm} | "after word 3" by the question before (all sets) | {previous} | | | |')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  if not argv or any('=' not in a for a in argv):
    print('usage: answer_errors.py ARM=RUN_DIR[,RUN_DIR...] ...', file=sys.stderr)
    return 1
  print(table({a.split('=', 1)[0]: a.split('=', 1)[1].split(',') for a in argv}))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

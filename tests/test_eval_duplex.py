"""Scoring streamed conversations: sentences between WAITs, answer turns by time, pooled metrics."""

import numpy as np

from flmjax.config import ModelConfig
from flmjax.eval import turn_taking
from flmjax.eval.duplex import pool, score_turns, split_on_wait
from flmjax.eval.report import markdown

CFG = ModelConfig.tiny()
W = CFG.text_wait_id


class WordTokenizer:
  vocab_size = 100

  def decode(self, ids):
    return ' '.join(f'w{i}' for i in ids)


def test_split_on_wait():
  ids = [W, 5, 6, W, W, 7, CFG.text_eos_id, 8, 9, 10]
  assert split_on_wait(ids, CFG) == [[5, 6], [7], [8, 9, 10]]
  assert split_on_wait([W, W], CFG) == []


def test_answer_turns_are_scored_in_their_own_window():
  seg = lambda who, a, b, text: {'speaker': who, 'start': a, 'end': b, 'text': text}
  conv = {
    'segments': [
      seg('user', 0, 4, 'q'),
      seg('model', 6, 9, 'w1 w2'),
      seg('user', 11, 15, 'q'),
      seg('model', 17, 20, 'w3'),  # cut at 19:
      seg('user', 18, 22, 'q'),
      seg('model', 24, 26, 'w4 w5'),
      seg('user', 28, 30, 'q'),
    ],  # no answer: not a turn
    'events': [
      ('turn_end', 4, 11),
      ('turn_end', 15, 18),
      ('interrupt', 18, 22),
      ('turn_end', 22, 28),
      ('turn_end', 30, 34),
    ],
  }
  text = np.full(34, W)
  text[[4, 5]] = [1, 2]  # right, in the window [4, 11)
  text[16] = 3  # the cut answer: not scored
  text[[22, 23, 24]] = [4, 99, 5]  # one word too many: wrong
  turns = score_turns(text, conv, WordTokenizer(), CFG)
  assert [(t['frame'], t['said'], t['reference'], t['right']) for t in turns] == [
    (4, 'w1 w2', 'w1 w2', True),
    (22, 'w4 w99 w5', 'w4 w5', False),
  ]
  text[23] = W  # two sentences in one window count as their words joined
  assert score_turns(text, conv, WordTokenizer(), CFG)[1]['right']
  text[23] = 150  # an id past the tokenizer (a model-only special) is dropped
  assert score_turns(text, conv, WordTokenizer(), CFG)[1]['said'] == 'w4 w5'
  text[[3, 11]] = 7  # text before the user's turn ends, or after the next onset: not counted
  assert score_turns(text, conv, WordTokenizer(), CFG)[0]['right']


def test_pool_equals_scoring_the_events_together():
  a = turn_taking(
    np.array([0, 0, 1, 1, 0, 0, 0], bool),
    [('turn_end', 0, 5), ('interrupt', 3, 7), ('pause', 5, 7)],
  )
  b = turn_taking(
    np.array([1, 0, 0, 0, 1, 1], bool), [('turn_end', 1, 6), ('pause', 1, 3), ('turn_end', 0, 1)]
  )
  # the same timelines side by side, far enough apart that no window crosses between them
  both = turn_taking(
    np.array([0, 0, 1, 1, 0, 0, 0] + [0] * 30 + [1, 0, 0, 0, 1, 1], bool),
    [
      ('turn_end', 0, 5),
      ('interrupt', 3, 7),
      ('pause', 5, 7),
      ('turn_end', 38, 43),
      ('pause', 38, 40),
      ('turn_end', 37, 38),
    ],
  )
  pooled = pool([a, b])
  for key in (
    'takeover_rate',
    'response_latency_ms',
    'pause_takeover_rate',
    'interrupt_stop_rate',
    'interrupt_stop_latency_ms',
    'counts',
    'response_latency_ms_mean',
    'response_latency_ms_p10',
    'response_latency_ms_p90',
  ):
    assert pooled[key] == both[key], key
  assert sorted(pooled['response_latency_ms_all']) == sorted(both['response_latency_ms_all'])
  report = {
    'turn_taking': pooled,
    'turn_accuracy': 0.5,
    'right': 1,
    'turns': 2,
    'conversations': [{}, {}],
    'teacher_forced': {'duplex': {'acc_text': 0.25}},
  }
  table = markdown(report)
  assert '| pause takeover rate (lower is better) | 0.000 |' in table
  assert '| exact answers (turns right) | 0.500 |' in table
  assert '| teacher-forced duplex: text acc | 0.250 |' in table
  assert '| interrupt stop rate | 1.000 |' in table


def test_timeline_shows_references_marks_and_metrics(tmp_path):
  """A timeline PNG: the title holds the conversation's metrics; every answer turn's reference is
  drawn with a check (right) or a cross (wrong)."""
  import matplotlib

  matplotlib.use('Agg')
  from unittest import mock

  import matplotlib.axes

  from flmjax.eval import report as report_lib

  cfg = ModelConfig.tiny()
  active = np.zeros(30, bool)
  active[5:9] = active[20:24] = True
  events = [('turn_end', 3, 15), ('turn_end', 18, 30), ('pause', 1, 2)]
  conv = {
    'id': 'c1',
    'events': events,
    'user_active': [1, 0, 1] + [0] * 27,
    'model_active': active.astype(int).tolist(),
    'text_ids': [cfg.text_wait_id] * 30,
    'turns': [
      {'frame': 3, 'said': 'it is ten', 'reference': 'it is ten', 'right': True},
      {'frame': 18, 'said': 'it is two', 'reference': 'it is four', 'right': False},
    ],
    'turn_taking': turn_taking(active, events),
  }
  title = report_lib._title(conv)
  assert title.startswith('c1: answers 1/2 right; takeover 1.00, pause takeover 0.00')
  assert 'latency median 160 ms' in title
  drawn = []
  real_text = matplotlib.axes.Axes.text
  with mock.patch.object(
    matplotlib.axes.Axes,
    'text',
    lambda ax, x, y, s, **kw: drawn.append(s) or real_text(ax, x, y, s, **kw),
  ):
    report_lib.plot_timeline(conv, WordTokenizer(), cfg, str(tmp_path / 'c1.png'))
  assert '\u2713 ref: it is ten' in drawn and '\u2717 ref: it is four' in drawn
  assert (tmp_path / 'c1.png').stat().st_size > 1000


def test_markdown_under_fdb_rules_and_the_sets_table():
  from flmjax.eval.report import sets_markdown, wilson

  fdb = turn_taking(np.zeros(30, bool), [('turn_end', 0, 30)], rules='fdb', words=[(2, 20)])
  report = {
    'turn_taking': fdb,
    'turn_taking_fdb': fdb,
    'turns': 2,
    'right': 1,
    'turn_accuracy': 0.5,
  }
  report['conversations'] = [{}]
  table = markdown(report)
  assert "under Full-Duplex-Bench's rules" in table
  assert '| response latency, mean ms | 160 |' in table and 'FDB rules |' not in table
  row = sets_markdown({'standard': report}).splitlines()[2]
  low, high = wilson(1, 2)
  assert row.startswith(f'| standard (1) | 0.500 [{low:.2f}, {high:.2f}] (1/2) | 1.000')
  assert '| 160/160/160 |' in row
  assert wilson(0, 0) is None and wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0

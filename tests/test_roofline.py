"""experiments/roofline.py on tiny shapes: every program runs, its analysed twin counts each
scanned layer, and each roofline is positive and below the measured time (no time asserted)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'experiments'))

import roofline  # noqa: E402


def test_unrolled_twin_counts_every_scan_step():
  w, x = jnp.ones((6, 64, 64)), jnp.ones((2, 64))
  # Built afresh on every call, as each program is (a jit traced once keeps its trace).
  fresh = lambda: jax.jit(lambda x, w: jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0])
  build = lambda: (fresh(), (x, w), (), None)
  flops, _, _ = roofline.analyse(roofline.Program('scan', 2, build))
  once, _ = roofline.cost(fresh().lower(x, w).compile())  # XLA: the loop body once
  assert flops == pytest.approx(6 * 2 * 2 * 64 * 64, rel=0.05)
  assert once < flops / 3


@pytest.mark.slow
def test_roofline_runs_on_tiny_programs_and_stays_below_measured(tiny_model):
  from flmjax.codec import Mimi
  from flmjax.codec.mimi_config import MimiConfig
  from flmjax.config import ModelConfig

  mimi = Mimi.random(MimiConfig.small(), seed=0)
  programs = (
    roofline.decode_programs(tiny_model, 'tiny', [1], 16, greedy=True)
    + roofline.decode_programs(tiny_model, 'tiny', [2], 16)
    + roofline.mimi_programs(mimi, [1])
    + roofline.serve_programs(tiny_model, 'tiny', mimi, [2], 16)
    + [roofline.train_program('tiny', ModelConfig.tiny(), 2, 16)]
  )
  limits = roofline.machine_limits(bandwidth_bytes=1 << 26, matmul_n=512)
  rows, bw, peak = roofline.run(programs, repeats=3, limits=limits)
  assert bw > 0 and peak > 0
  assert [r['program'].split()[0] for r in rows] == ['decode', 'decode', 'Mimi', 'serve', 'train']
  for r in rows:
    assert r['gflop'] > 0 and r['mb'] > 0, r
    assert 0 < r['roofline_ms'] < r['measured_ms'], r
    assert roofline.format_row(r).count('|') == 12


def test_self_times_take_children_out_of_their_parents():
  import op_profile

  # thread a: a loop (0-100) holding two ops and an executor span; thread b: one op
  events = [
    (0, 100, 'while.1'),
    (10, 30, 'dot.2'),
    (50, 20, 'ThunkExecutor::Execute'),
    (55, 10, 'fusion.3'),
  ]
  own, busy = op_profile.self_times([('a', events), ('b', [(5, 40, 'dot.2')])])
  assert own == {'while.1': 50, 'dot.2': 70, 'ThunkExecutor::Execute': 10, 'fusion.3': 10}
  assert busy == {'a': 100, 'b': 40}
  names = {'dot.2': 'aD,DV->aV/dot_general', 'fusion.3': 'mul'}
  rows = op_profile.table(own, names, calls=2)
  assert [r['op'] for r in rows] == ['aD,DV->aV/dot_general', '(while)', 'mul']
  assert rows[0]['ms'] == 35e-6 and sum(r['share'] for r in rows) == pytest.approx(1.0)


@pytest.mark.slow
def test_op_profile_names_the_decode_frames_ops(tiny_model):
  """A traced tiny decode frame: its ops are found on XLA's threads and named by the jax
  operations that made them (the text head's einsum among them); no time is asserted."""
  import op_profile

  (program,) = roofline.decode_programs(tiny_model, 'tiny', [2], 16)
  rows, busy, wall_ms = op_profile.profile(program, calls=2)
  ops = [r['op'] for r in rows]
  assert wall_ms > 0 and busy and all(0 < b <= 1.5 for b in busy.values()), busy
  assert any(op.startswith('aD,DV->aV') for op in ops), ops  # the text head
  assert sum(r['share'] for r in rows) == pytest.approx(1.0)
  named = sum(r['share'] for r in rows if not r['op'].startswith('('))
  assert named > 0.5, rows  # most op time maps to a jax operation

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

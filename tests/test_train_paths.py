"""Run-directory writes go through etils.epath: with epath's test backend standing in for a
bucket, a `gs://` run directory gets its metrics, plots and summary (nothing lands in the cwd)."""

import os
import sys

from etils import epath

from flmjax.config import ModelConfig
from flmjax.train import observe
from flmjax.train.config import StageConfig, TrainConfig
from flmjax.train.observe import write_summary


def _in_bucket(root):
  """epath mocks that map gs://... onto `root`/... for every path argument."""

  def local(arg):
    return (
      os.path.join(root, os.fspath(arg)[len('gs://') :])
      if os.fspath(arg).startswith('gs://')
      else arg
    )

  def redirect(fn, *args, **kw):
    return fn(*[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kw)

  names = (
    'exists',
    'glob',
    'isdir',
    'listdir',
    'makedirs',
    'mkdir',
    'open',
    'remove',
    'rename',
    'replace',
    'rmtree',
    'stat',
  )
  return epath.testing.mock_epath(**dict.fromkeys(names, redirect))


def test_a_bucket_run_dir_gets_metrics_plots_and_summary(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)  # optional, and no GCS client here
  bucket = tmp_path / 'bucket_root'
  tc = TrainConfig(
    model=ModelConfig.tiny(),
    stages=(StageConfig('a', 2, random_data=True), StageConfig('b', 1, random_data=True)),
    run_dir='gs://bucket/run',
    progress_bar=False,
  )
  keys = observe.SUMMARY_KEYS + ('grad_norm', 'lr', 'frames_per_s')
  with _in_bucket(bucket):
    epath.Path(tc.run_dir).mkdir(parents=True, exist_ok=True)
    obs = observe.Observer(tc, enabled=True, initial_step=0, total=3)
    for step, stage in ((1, 0), (2, 0), (3, 1)):
      obs.record(step, stage, {k: float(step) for k in keys})
    obs.close()
    assert [r['step'] for r in observe.history(tc.run_dir)] == [1, 2, 3]
    plots = observe.write_plots(tc.run_dir, tc)
    summary = write_summary(tc.run_dir, {'global_step': 3, 'stages': [], 'eval': None})
  assert plots[0] == 'gs://bucket/run/loss_total.png' and summary == 'gs://bucket/run/summary.json'
  written = sorted(os.listdir(bucket / 'bucket' / 'run'))
  assert written == [
    'loss_acoustic.png',
    'loss_semantic.png',
    'loss_text.png',
    'loss_total.png',
    'metrics.jsonl',
    'summary.json',
  ]
  assert not (tmp_path / 'gs:').exists()

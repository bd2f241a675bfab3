"""A training data loader with a NaN in one batch's weights: the tests of the NaN stop."""

import grain
import numpy as np

from flmjax.train import data as data_lib


class Poisoned(grain.DatasetIterator):
  """Wraps a stage loader; its `at`-th batch (1-based) gets a NaN weight."""

  def __init__(self, inner, at: int):
    super().__init__()
    self.inner, self.at, self.n = inner, at, 0

  def __next__(self):
    batch, self.n = next(self.inner), self.n + 1
    if self.n == self.at:
      batch['weights'] = batch['weights'].copy()
      batch['weights'][0, 0, 5] = np.nan
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, s):
    self.inner.set_state(s)


def poison_batch(monkeypatch, at: int = 3) -> None:
  """Every stage loader made from now on (in this test) poisons its `at`-th batch."""
  make = data_lib.make_stage_loader
  monkeypatch.setattr(data_lib, 'make_stage_loader', lambda *a, **k: Poisoned(make(*a, **k), at))

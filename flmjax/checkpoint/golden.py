"""The forward of the official tiny checkpoint against the official PyTorch forward's outputs
(the golden fixtures): `flmjax main --parity`."""

from __future__ import annotations

import os

import numpy as np

from flmjax.checkpoint.official import load_official


def parity(golden_dir: str) -> dict[str, float]:
  """Relative errors (and argmax agreement) of hidden states and logits on forward.npz."""
  model = load_official(os.path.join(golden_dir, 'flm_tiny'), dtype='float32')
  ref = np.load(os.path.join(golden_dir, 'flm_tiny', 'forward.npz'))
  out = model(ref['text'], ref['speak'], ref['listen'], ref['depth_tokens'][..., :-1])
  report = {}
  for name, ours in (
    ('hidden', out.hidden),
    ('text_logits', out.text_logits),
    ('depth_logits', out.depth_logits),
  ):
    ours = np.asarray(ours)
    report[name] = float(np.linalg.norm(ours - ref[name]) / np.linalg.norm(ref[name]))
    if name != 'hidden':
      report[name + '_argmax'] = float((ours.argmax(-1) == ref[name].argmax(-1)).mean())
  return report

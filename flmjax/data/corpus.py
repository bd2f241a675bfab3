"""The embedded synthetic corpus, generated and prepared once per directory.

A config names it (`SyntheticCorpus`) without building it: its paths are known up front, and
`flmjax train` builds it when training starts (`build`, idempotent), so loading a config has no
side effects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from flmjax.data.timing import HELDOUT_VARIANTS, TRAINING, Timing

SPLITS = ('tts_asr', 'duplex', 'heldout_tts_asr', 'heldout_duplex')  # prepared for training
HELDOUT_DUPLEX = ('heldout_duplex', *HELDOUT_VARIANTS)  # raw manifests, streamed by `flmjax main`
VERSION = 4  # of the generator and prepare: a corpus made by another version is made again


@dataclasses.dataclass(frozen=True)
class SyntheticCorpus:
  """flmjax.data.synthetic's corpus under `root`: raw/ (manifests, codes, tokenizer.model) and
  prepared/<split> (ArrayRecord shards), for every split in SPLITS."""

  root: str
  seed: int = 0
  num_tts_asr: int = 400
  num_duplex: int = 400
  num_heldout: int = 64
  timing: Timing = TRAINING  # the conversations' ranges (flmjax.data.timing)
  # extra training splits, ((name in synthetic.EXTRA_SPLITS, samples), ...); the others do not
  # change with them
  extras: tuple[tuple[str, int], ...] = ()

  @property
  def splits(self) -> tuple[str, ...]:
    return SPLITS + tuple(name for name, _ in self.extras)

  def split(self, name: str) -> str:
    """The prepared directory of split `name`, built or not."""
    if name not in self.splits:
      raise ValueError(f'synthetic corpus: no split {name!r}; the splits are {self.splits}')
    return os.path.join(os.path.abspath(self.root), 'prepared', name)

  @property
  def tokenizer(self) -> str:
    return os.path.join(os.path.abspath(self.root), 'raw', 'tokenizer.model')

  def manifest(self, name: str) -> str:
    """The raw JSONL manifest of split `name` (SPLITS and the held-out variants)."""
    if name not in self.splits + HELDOUT_DUPLEX:
      raise ValueError(
        f'synthetic corpus: no manifest {name!r}; there are {self.splits + HELDOUT_DUPLEX}'
      )
    return os.path.join(os.path.abspath(self.root), 'raw', f'{name}.jsonl')

  def build(self, log=print) -> dict[str, str]:
    """Generates and prepares the corpus unless the same one is there already.
    Returns {'tokenizer': path, <split>: prepared dir}."""
    from flmjax.data import synthetic
    from flmjax.data.prepare import format_summary, prepare
    from flmjax.data.tokenizer import load_tokenizer

    root = os.path.abspath(self.root)
    done = os.path.join(root, 'corpus.json')
    want = {
      'seed': self.seed,
      'num_tts_asr': self.num_tts_asr,
      'num_duplex': self.num_duplex,
      'num_heldout': self.num_heldout,
      'timing': dataclasses.asdict(self.timing),
    }
    if self.extras:  # absent when none, so corpora made before extras existed still match
      want['extras'] = dict(self.extras)
    # as JSON holds it (tuples become lists), so that the comparison below can hold
    want_json = json.loads(json.dumps(want))
    if os.path.exists(done):
      with open(done) as f:
        info = json.load(f)
      if info.get('args') == want_json and info.get('version') == VERSION:
        return info['paths']
    raw = synthetic.generate(
      os.path.join(root, 'raw'),
      seed=self.seed,
      num_tts_asr=self.num_tts_asr,
      num_duplex=self.num_duplex,
      num_heldout=self.num_heldout,
      timing=self.timing,
      extras=dict(self.extras),
    )
    tokenizer = load_tokenizer(raw['tokenizer'])
    paths = {'tokenizer': raw['tokenizer']}
    for split in self.splits:
      out = self.split(split)
      if os.path.exists(out):
        shutil.rmtree(out)
      log(format_summary(prepare(raw[split], out, tokenizer, progress=False)))
      paths[split] = out
    with open(done, 'w') as f:
      json.dump({'args': want_json, 'version': VERSION, 'paths': paths}, f, indent=2)
    return paths


def ensure_synthetic_corpus(root: str, **kw) -> dict[str, str]:
  """Builds `SyntheticCorpus(root, **kw)` now; returns its paths."""
  return SyntheticCorpus(root, **kw).build()

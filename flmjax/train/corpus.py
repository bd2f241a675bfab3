"""The embedded synthetic corpus, generated and prepared once per run directory."""
from __future__ import annotations

import json
import os

SPLITS = ('tts_asr', 'duplex', 'heldout_tts_asr', 'heldout_duplex')
VERSION = 2  # of the generator and prepare: a corpus made by another version is made again


def ensure_synthetic_corpus(root: str, *, seed: int = 0, num_tts_asr: int = 400,
                            num_duplex: int = 400, num_heldout: int = 64) -> dict[str, str]:
  """Generates the corpus (flmjax.data.synthetic) under root/raw and prepares every split with
  `flmjax data prepare` under root/prepared/<split>. Idempotent: a finished corpus is reused.
  Returns {'tokenizer': path, <split>: prepared dir}."""
  root = os.path.abspath(root)
  done = os.path.join(root, 'corpus.json')
  want = {'seed': seed, 'num_tts_asr': num_tts_asr, 'num_duplex': num_duplex,
          'num_heldout': num_heldout}
  if os.path.exists(done):
    with open(done) as f:
      info = json.load(f)
    if info.get('args') == want and info.get('version') == VERSION:
      return info['paths']
  from flmjax.data import cli as data_cli
  from flmjax.data import synthetic
  raw = synthetic.generate(os.path.join(root, 'raw'), **want)
  paths = {'tokenizer': raw['tokenizer']}
  for split in SPLITS:
    out = os.path.join(root, 'prepared', split)
    if os.path.exists(out):
      import shutil
      shutil.rmtree(out)
    rc = data_cli.main(['prepare', raw[split], out, '--tokenizer', raw['tokenizer'],
                        '--no-progress'])
    if rc:
      raise RuntimeError(f'flmjax data prepare {raw[split]} failed with exit status {rc}')
    paths[split] = out
  with open(done, 'w') as f:
    json.dump({'args': want, 'version': VERSION, 'paths': paths}, f, indent=2)
  return paths

"""Helpers of the bad-input probes (tests/test_bad_input_*.py): run a CLI as a new user would and
check that a bad input gets exactly one clear stderr line and exit status 1."""

import json
import os

import numpy as np

from flmjax import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
  """-> (exit status, stdout, stderr) of `flmjax ARGV...` run in this process."""
  rc = cli.main([str(a) for a in argv])
  got = capsys.readouterr()
  return rc, got.out, got.err


def error_line(capsys, *argv: str) -> str:
  """Runs `flmjax ARGV...`, which must fail with status 1 and one `flmjax ...: error:` line on
  stderr (no traceback); returns that line."""
  rc, _, err = run(capsys, *argv)
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == 1, (rc, err)
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith('flmjax') and ': error: ' in lines[0], lines[0]
  record('clear_error', argv, lines[0])
  return lines[0]


def record(kind: str, argv, detail: str = '') -> None:
  """With $FLMJAX_PROBE_LOG set, appends one JSON line per probed input (for the counts in
  experiments/RESULTS.md): kind is 'clear_error' or 'recovery'."""
  path = os.environ.get('FLMJAX_PROBE_LOG')
  if path:
    with open(path, 'a') as f:
      f.write(json.dumps({'kind': kind, 'argv': [str(a) for a in argv], 'detail': detail}) + '\n')


def write_manifest(path, lines) -> str:
  path.write_text(''.join((x if isinstance(x, str) else json.dumps(x)) + '\n' for x in lines))
  return str(path)


def codes_file(path, shape=(8, 20), seed=0, high=2048) -> str:
  np.save(path, np.random.default_rng(seed).integers(0, high, shape))
  return path.name


def tts_line(codes: str, id='x', text='it is five', end=0.8) -> dict:
  return {
    'id': id,
    'kind': 'tts_asr',
    'codes': {'model': codes},
    'segments': [{'speaker': 'model', 'start': 0.0, 'end': end, 'text': text}],
  }

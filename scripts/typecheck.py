"""Runs pyright over flmjax/ (settings in pyproject.toml) and holds each file to its count of
errors in scripts/pyright_baseline.json, the count when the checker came in: a file with more
errors than its baseline (or a new file with any) fails, with the errors listed. `--update`
rewrites the baseline to today's counts (after errors are fixed, so counts only go down)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, 'scripts', 'pyright_baseline.json')


def main(argv: list[str]) -> int:
  pyright = os.path.join(os.path.dirname(sys.executable), 'pyright')
  run = subprocess.run([pyright, '--outputjson'], cwd=ROOT, capture_output=True, text=True)
  if not run.stdout.strip():
    print(run.stderr, file=sys.stderr)
    return 2
  report = json.loads(run.stdout)
  errors = collections.defaultdict(list)
  for d in report['generalDiagnostics']:
    if d['severity'] == 'error':
      path = os.path.relpath(d['file'], ROOT)
      errors[path].append(f'{path}:{d["range"]["start"]["line"] + 1}: {d["message"]}')
  counts = {path: len(found) for path, found in sorted(errors.items())}
  if '--update' in argv:
    with open(BASELINE, 'w') as f:
      json.dump(counts, f, indent=1, sort_keys=True)
      f.write('\n')
    print(f'pyright baseline: {sum(counts.values())} errors in {len(counts)} files')
    return 0
  with open(BASELINE) as f:
    baseline = json.load(f)
  over = [path for path, n in counts.items() if n > baseline.get(path, 0)]
  for path in over:
    print(
      f'{path}: {counts[path]} pyright errors, {baseline.get(path, 0)} allowed', file=sys.stderr
    )
    print('\n'.join(errors[path]), file=sys.stderr)
  down = [p for p, n in baseline.items() if counts.get(p, 0) < n]
  print(
    f'pyright: {sum(counts.values())} errors in {len(counts)} files (baseline '
    f'{sum(baseline.values())})' + (f'; {len(down)} files went down: --update' if down else '')
  )
  return 1 if over else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

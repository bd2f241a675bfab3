#!/usr/bin/env bash
# The package installs whole: builds a wheel, installs it (with its dependencies) in a fresh venv
# outside the repository, and from an empty directory runs `flmjax --help` and a short
# `flmjax main` (the embedded default that ships inside the package, 2 steps per stage).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Built from a copy of the sources: setuptools' build/ beside them may hold moved modules.
mkdir "$work/src"
cp -r flmjax kernels setup.py setup.cfg pyproject.toml README.md "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$work"/dist/flmjax-*.whl
mkdir "$work/empty"
cd "$work/empty"
env -u PYTHONPATH "$work/venv/bin/flmjax" --help >/dev/null
env -u PYTHONPATH "$work/venv/bin/flmjax" main --steps 2,2 --run-dir run >"$work/main.log" 2>&1 \
  || { tail -30 "$work/main.log"; exit 1; }
grep -q '^trained in ' "$work/main.log" || { tail -30 "$work/main.log"; exit 1; }
# the held-out chat attends over the longest training window (64 frames; RESULTS.md, issue 29)
grep -q 'attending to the last 64 frames' "$work/main.log" || { tail -30 "$work/main.log"; exit 1; }
echo "wheel smoke: flmjax --help and flmjax main --steps 2,2 ran from an installed wheel"

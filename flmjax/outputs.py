"""Where a command writes, checked before the work starts, so a long run never ends in a refused
write or in a replaced file its user kept. Errors name the argument (`out`); a command line
spells it as its flag (flmjax.cli.flags)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def check_out_file(out: str, what: str = 'file') -> None:
  """`out` must be a writable file path: not a directory, in a folder that exists and is
  writable. `what` says which file (e.g. '.wav file')."""
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out):
    raise IsADirectoryError(f'`out` {out} is a directory; give a {what} path')
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'`out` {out}: the folder {folder} does not exist; create it first')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise PermissionError(f'`out` {out}: the folder {folder} is not writable')


def check_out_dir(
  out: str,
  overwrite: bool,
  outputs: Sequence[str] | None = None,
  *,
  marker: str | None = None,
  ours: str = 'our output',
  replaced: str = 'them',
) -> None:
  """`out` must be a directory, or not exist yet, and hold nothing of ours unless `overwrite`.

  outputs: the names the command writes (only they count; an earlier run's are replaced with
  `overwrite`); None: any content counts. marker: a file that only the command's own output
  holds; a non-empty `out` without it is someone else's and is refused even with `overwrite`
  (`ours` names that output). replaced: what `overwrite` replaces, for the message."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f'`out` {out} is a file; give a directory path')
  if not os.path.isdir(out):
    return
  if outputs is not None:
    found = [f for f in outputs if os.path.exists(os.path.join(out, f))]
    if found and not overwrite:
      raise FileExistsError(
        f'`out` {out} already holds {found}; pass `overwrite` to replace {replaced} '
        'or choose another directory'
      )
    return
  if not os.listdir(out):
    return
  if marker is not None:
    if not os.path.isfile(os.path.join(out, marker)):
      raise FileExistsError(
        f'`out` {out} exists and is not {ours} (no {marker}); choose a new directory'
      )
    if not overwrite:
      raise FileExistsError(f'`out` {out} already holds {ours}; pass `overwrite` to replace it')
    return
  if not overwrite:
    raise FileExistsError(
      f'`out` {out} already exists and is not empty; pass `overwrite` to replace {replaced}, '
      'or choose another directory'
    )

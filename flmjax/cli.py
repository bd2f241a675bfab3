"""`flmjax` command line: dispatches to each subsystem's own entry point.

Every subcommand reports a bad input the same way: one line `flmjax CMD: error: ...` on stderr and
exit status 1 (`fail`, `ArgumentParser`). Set FLMJAX_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import sys
from collections.abc import Mapping

from flmjax.platforms import cpu_unless_accelerator

# subcommand -> (module, function, help). Modules load lazily so `flmjax --help` is instant.
COMMANDS = {
  'main': ('flmjax.main', 'main', 'run the embedded default end to end'),
  'data': ('flmjax.data.cli', 'main', 'data tools: `flmjax data prepare MANIFEST OUT_DIR`'),
  'train': ('flmjax.train.cli', 'main', 'train: `flmjax train --config CONFIG.py`'),
  'export': ('flmjax.train.cli', 'export_main', 'orbax checkpoint -> official PyTorch layout'),
  'chat': (
    'flmjax.decode.cli',
    'main',
    'offline full-duplex session: `flmjax chat --checkpoint DIR`',
  ),
  'serve': ('flmjax.serve.cli', 'main', 'websocket server, many live sessions: `flmjax serve`'),
  'client': ('flmjax.serve.cli', 'client_main', 'talk to a server: `flmjax client --in user.wav`'),
  'eval': (
    'flmjax.eval.cli',
    'main',
    'measure a talker: `flmjax eval duplex|fdb --checkpoint DIR`',
  ),
  'aot': (
    'flmjax.aot.cli',
    'main',
    'compile for a TPU topology without one: `flmjax aot --topology v5p:4x4x4`',
  ),
}

RUN_MODELS = ('main', 'train', 'chat', 'serve', 'eval')  # the commands that run on a device

# What a user's input can raise: a message that names the file, field and fix, not a bug.
INPUT_ERRORS = (OSError, ValueError)


def spell(message: str, flags: Mapping[str, str]) -> str:
  """A library message as a command says it: library errors name arguments in backticks
  (`out`, `overwrite`), and `flags` maps each to the command's flag (`--out`, `--overwrite`).
  An argument the command has no flag for keeps its backticks."""
  return re.sub(r'`([^`\s]+)`', lambda m: flags.get(m[1], m[0]), message)


def fail(prog: str, message: str) -> int:
  """Prints `prog: error: message` as one line on stderr; returns the exit status 1."""
  message = ' '.join(str(message).split('\n'))
  print(f'{prog}: error: {message}', file=sys.stderr)
  return 1


def command(prog: str, flags: Mapping[str, str] | None = None):
  """Decorates a subcommand's `main(argv) -> int`: input errors become `fail(prog, message)`, with
  the library's argument names spelled as the command's `flags` (`spell`), and argparse's exits a
  return value, so callers in Python get the exit status too."""

  def wrap(fn):
    @functools.wraps(fn)
    def run(argv: list[str]) -> int:
      try:
        return int(fn(argv) or 0)
      except SystemExit as e:  # --help (0) and usage errors (1)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
      except INPUT_ERRORS as e:
        if os.environ.get('FLMJAX_TRACEBACK'):
          raise
        return fail(prog, spell(str(e), flags or {}) or type(e).__name__)

    return run

  return wrap


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one stderr line and exit status 1, like every other error.
  Every command's flags are spelled with dashes (`--run-dir`)."""

  def error(self, message: str):
    self.exit(1, f'{self.prog}: error: {message} (see {self.prog} --help)\n')

  def add_flag(self, name: str, *old: str, **kw) -> argparse.Action:
    """`add_argument(name, **kw)`, plus earlier spellings of the flag (`--run_dir`) that still
    parse the same way but stay out of --help, so existing scripts keep working."""
    action = self.add_argument(name, **kw)
    for alias in old:
      self.add_argument(
        alias,
        **{**kw, 'dest': action.dest, 'default': argparse.SUPPRESS, 'help': argparse.SUPPRESS},
      )
    return action


def add_set_flag(ap: argparse.ArgumentParser) -> argparse.Action:
  """`--set KEY=VALUE`, repeatable: overrides of the loaded training config's fields
  (flmjax.train.overrides), after the config file or preset and before the command's own flags."""
  return ap.add_argument(
    '--set',
    dest='overrides',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='override a field of the config, typed by its annotation (repeatable; a later one '
    'wins): batch_size=16, optim.b1=0.8, stages.duplex.steps=10 (a stage by name or index), '
    'lora.rank=8, lora.targets=attn,mlp, init_from=null',
  )


def config_error(error: Exception, run_dir_flag: str | None = '--run-dir') -> str:
  """A config error as the command line says it: an override by its `--set` flag."""
  overrides, reason = getattr(error, 'overrides', None), getattr(error, 'reason', '')
  if not overrides:
    return str(error)
  if run_dir_flag and len(overrides) == 1 and overrides[0].partition('=')[0] == 'run_dir':
    reason = f'give the run directory as {run_dir_flag} DIR (the config derives its paths from it)'
  return f'{" ".join(f"--set {o}" for o in overrides)}: {reason}'


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  platform_note = cpu_unless_accelerator()
  if not argv or argv[0] in ('-h', '--help'):
    print('usage: flmjax COMMAND [ARGS]\n\ncommands:')
    for name, (_, _, text) in COMMANDS.items():
      print(f'  {name:8s} {text}')
    return 0
  if argv[0] not in COMMANDS:
    return fail(
      'flmjax', f'unknown command {argv[0]!r}; use one of {list(COMMANDS)} (see flmjax --help)'
    )
  if platform_note and argv[0] in RUN_MODELS and not {'-h', '--help'} & set(argv):
    print(f'flmjax {argv[0]}: {platform_note}')  # stdout: an error stays one stderr line
  module, func, _ = COMMANDS[argv[0]]
  loaded = importlib.import_module(module)
  flags = getattr(loaded, 'FLAGS', None)  # how the command spells the library's arguments
  return command(f'flmjax {argv[0]}', flags)(getattr(loaded, func))(argv[1:])  # a decorated
  # main has spelled them already


if __name__ == '__main__':
  sys.exit(main())

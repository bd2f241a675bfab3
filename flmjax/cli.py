"""`flmjax` command line: dispatches to each subsystem's own entry point."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, help). Modules load lazily so `flmjax --help` is instant.
COMMANDS = {
    'main': ('flmjax.main', 'main', 'run the embedded default end to end'),
    'data': ('flmjax.data.cli', 'main', 'data tools: `flmjax data prepare MANIFEST OUT_DIR`'),
    'train': ('flmjax.train.cli', 'main', 'train: `flmjax train --config CONFIG.py`'),
    'export': ('flmjax.train.export', 'main', 'orbax checkpoint -> official PyTorch layout'),
    'chat': ('flmjax.decode.cli', 'main', 'offline full-duplex session: `flmjax chat --checkpoint DIR`'),
}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help') or argv[0] not in COMMANDS:
    print('usage: flmjax COMMAND [ARGS]\n\ncommands:')
    for name, (_, _, text) in COMMANDS.items():
      print(f'  {name:8s} {text}')
    return 0 if not argv or argv[0] in ('-h', '--help') else 2
  module, func, _ = COMMANDS[argv[0]]
  result = getattr(importlib.import_module(module), func)(argv[1:])
  return int(result or 0)


if __name__ == '__main__':
  sys.exit(main())

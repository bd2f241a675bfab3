"""The flags decoding commands share: sampling (`flmjax chat`, `flmjax serve`), one flag per
SamplingConfig field, and the config they give; the paged KV cache (`flmjax serve`, `flmjax eval
duplex`)."""

from __future__ import annotations

import re

from flmjax.decode.sampling import SamplingConfig

FLAG_FIELDS = ('temp', 'top_k', 'top_p', 'repetition_penalty')  # x (text, audio): the flags


def add_sampling_flags(ap) -> None:
  """--temp-text, --top-k-audio, ...: one argparse flag per SamplingConfig field, same defaults."""
  for field in FLAG_FIELDS:
    for kind in ('text', 'audio'):
      name = f'{field}_{kind}'
      default = getattr(SamplingConfig, name)
      ap.add_argument('--' + name.replace('_', '-'), type=type(default), default=default)


def sampling_from_flags(args) -> SamplingConfig:
  """The SamplingConfig of parsed add_sampling_flags flags (and --greedy). A bad value is a
  ValueError that names the flag (`--temp-text -1.0: temperature must be >= 0`)."""
  names = [f'{field}_{kind}' for field in FLAG_FIELDS for kind in ('text', 'audio')]
  try:
    return SamplingConfig(greedy=args.greedy, **{name: getattr(args, name) for name in names})
  except ValueError as e:  # name the flag, not the dataclass field
    flag = lambda m: '--' + m[1].replace('_', '-') + ' '
    raise ValueError(re.sub(r'SamplingConfig\.(\w+)=', flag, str(e))) from None


def add_kv_flags(ap, kv_pages_help: str) -> None:
  """--kv-pages N, --page-size P, --kv-dtype bf16|int8: the paged KV cache's flags."""
  ap.add_argument('--kv-pages', type=int, default=None, help=kv_pages_help)
  ap.add_argument('--page-size', type=int, default=128, help='positions a KV page (paged)')
  ap.add_argument(
    '--kv-dtype', choices=('bf16', 'int8'), default='bf16', help='the paged pool in bf16 or int8'
  )


def check_kv_dtype(args) -> None:
  """An int8 cache is paged only: --kv-dtype int8 needs --kv-pages (ValueError naming both)."""
  if args.kv_dtype != 'bf16' and args.kv_pages is None:
    raise ValueError(f'--kv-dtype {args.kv_dtype} needs --kv-pages N (int8 is paged-only)')

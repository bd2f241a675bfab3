"""The sampling flags every decoding command shares (`flmjax chat`, `flmjax serve`): one flag per
SamplingConfig field, and the config they give."""

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

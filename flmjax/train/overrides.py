"""Overrides of a loaded TrainConfig, `KEY=VALUE` each (`flmjax train --set batch_size=16`).

KEY is a dotted path through the config's fields: `batch_size`, `optim.b1`, `lora.rank` (a None
section is built from its fields), `stages.duplex.steps` (a stage by name or index),
`eval_sources.0.weight`. VALUE is read as YAML for lists and null (`[attn, mlp]`, `null`);
a tuple field also takes `a,b`. draccus does the typing: the config is encoded to plain data,
the overrides are set in it, and draccus decodes it back into the frozen dataclasses, so every
value is converted to its field's annotated type and every `__post_init__` check runs again.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

import draccus
from draccus.cfgparsing import parse_string
from draccus.utils import DecodingError, ParsingError

from flmjax.train.config import TrainConfig, TrainConfigError, load_config_file


class OverrideError(TrainConfigError):
  """An override names no field, or its value does not fit the field. `overrides` are the
  arguments at fault as given (one, unless only their combination fails), `reason` what is wrong
  and how to fix it."""

  def __init__(self, overrides: str | Sequence[str], reason: str):
    self.overrides = (overrides,) if isinstance(overrides, str) else tuple(overrides)
    self.reason = reason
    super().__init__(f'override {", ".join(map(repr, self.overrides))}: {reason}')


def _unwrap(tp: Any) -> Any:
  """`X | None` -> X; anything else as it is."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else tp
  return tp


def _child(node: Any, tp: Any, key: str, where: str, text: str) -> tuple[Any, Any]:
  """(the key as its container indexes it, the key's type) one level down from `where`."""
  tp = _unwrap(tp)
  if typing.get_origin(tp) is tuple:  # a tuple of sections: by index, or a stage by name
    names = [e.get('name') if isinstance(e, dict) else None for e in node]
    if key.isdigit() and int(key) < len(node):
      return int(key), typing.get_args(tp)[0]
    if key in names:
      return names.index(key), typing.get_args(tp)[0]
    known = [str(i) for i in range(len(node))] + [n for n in names if n]
    raise OverrideError(text, f'{where} has no entry {key!r}; give one of {", ".join(known)}')
  if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
    raise OverrideError(text, f'{where} is a value, not a section with fields')
  fields = [f.name for f in dataclasses.fields(tp) if f.init]
  if key not in fields:
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    raise OverrideError(
      text, f'{where} has no field {key!r}{hint}; its fields: {", ".join(fields)}'
    )
  return key, typing.get_type_hints(tp)[key]


def _walk(data: dict, path: Sequence[str], text: str, build: bool = False):
  """(the container of path[-1], its key there, the type of path[-1], the path with indices for
  names); `build` makes an unset section (lora=None) an empty one, built from the fields given."""
  node, slot, tp, where, slots = data, None, TrainConfig, 'TrainConfig', []
  for i, part in enumerate(path):
    if slot is not None:
      if node[slot] is None and build:
        node[slot] = {}
      node = node[slot]
    slot, tp = _child(node, tp, part, where, text)
    where, slots = '.'.join(path[: i + 1]), [*slots, str(slot)]
  return node, slot, tp, '.'.join(slots)


def _value(raw: str, tp: Any) -> Any:
  """The override's value as draccus decodes it: a scalar stays text (draccus converts it to
  the field's type, so `true` never becomes 1), a YAML list or null is parsed."""
  parsed = parse_string(raw)
  if parsed is None or isinstance(parsed, (list, dict)):
    return parsed
  if typing.get_origin(_unwrap(tp)) is tuple:
    return [] if raw == '' else raw.split(',')
  return raw


def _set(data: dict, text: str) -> str:
  """Sets one KEY=VALUE in the encoded config; returns KEY as draccus names it (indices)."""
  key, sep, raw = text.partition('=')
  if not sep or not key:
    raise OverrideError(text, 'give KEY=VALUE, e.g. batch_size=16 or stages.duplex.steps=10')
  if key == 'run_dir':
    raise OverrideError(
      text, "run_dir is the argument the config's get_config(run_dir) receives, not a field"
    )
  node, slot, tp, path = _walk(data, key.split('.'), text, build=True)
  section = _unwrap(tp)
  item = typing.get_args(section)[0] if typing.get_origin(section) is tuple else None
  whole = isinstance(parse_string(raw), (dict, list, type(None)))  # YAML: a whole section
  if not whole and any(
    isinstance(t, type) and dataclasses.is_dataclass(t) for t in (section, item)
  ):
    raise OverrideError(text, f'{key} is a section: set its fields ({key}.FIELD=VALUE)')
  value = _value(raw, tp)
  node[slot] = value
  return path


def _reason(e: Exception, key: str | None) -> str:
  """draccus's error, or the config's own check that it wraps, as one line."""
  while isinstance(e, ParsingError) and not isinstance(e, DecodingError) and e.__cause__:
    e = e.__cause__  # type: ignore[assignment]
  if isinstance(e, DecodingError):
    path = '.'.join(map(str, e.key_path))
    e_text = e.message if path == key else f'{path}: {e.message}'
  else:
    e_text = str(e)
  return ' '.join(e_text.split())


def _precise(data: dict, e: Exception) -> Exception:
  """draccus reports a failed `X | None` section as not decoding into any of its types; decoding
  the section as X names the fault (a missing field, the section's own check)."""
  path = [str(p) for p in getattr(e, 'key_path', ())]
  if not path:
    return e
  try:
    node, slot, tp, _ = _walk(data, path, '')
  except OverrideError:
    return e
  if _unwrap(tp) is tp:
    return e
  try:
    draccus.decode(_unwrap(tp), node[slot])
  except DecodingError as inner:
    return DecodingError((*path, *inner.key_path), inner.message)
  except (ParsingError, TypeError, ValueError) as inner:
    return inner
  return e


def _decode(data: dict) -> TrainConfig:
  return draccus.decode(TrainConfig, data)


def _blame(
  cfg: TrainConfig, e: Exception, overrides: Sequence[str], keys: Sequence[str]
) -> tuple[str, ...]:
  """The overrides a decoding error is about: the last one whose key leads to the error's path;
  else the one that fails alone with the same error; else all of them."""
  path = [str(p) for p in getattr(e, 'key_path', ())]
  for text, key in reversed(list(zip(overrides, keys))):
    n = min(len(path), len(key.split('.')))
    if path and key.split('.')[:n] == path[:n]:
      return (text,)
  same = []
  for text in overrides:
    data = draccus.encode(cfg)
    _set(data, text)
    try:
      _decode(data)
    except (ParsingError, TypeError, ValueError) as alone:
      if _reason(alone, None) == _reason(e, None):
        same.append(text)
  return tuple(same) if len(same) == 1 else tuple(overrides)


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
  """cfg with each `KEY=VALUE` of `overrides` set, in order (a later one wins), typed and
  checked as a whole; an OverrideError names the one at fault."""
  if not overrides:
    return cfg
  data = draccus.encode(cfg)
  keys = [_set(data, text) for text in overrides]
  try:
    return _decode(data)
  except (ParsingError, TypeError, ValueError) as e:
    blamed = _blame(cfg, e, overrides, keys)
    key = keys[overrides.index(blamed[0])] if len(blamed) == 1 else None
    raise OverrideError(blamed, _reason(_precise(data, e), key)) from None


def load_config(
  path: str, run_dir: str | None = None, overrides: Sequence[str] = (), **kwargs
) -> TrainConfig:
  """`load_config_file(path, run_dir, **kwargs)` (a file or a preset), then `overrides`."""
  return apply_overrides(load_config_file(path, run_dir, **kwargs), overrides)

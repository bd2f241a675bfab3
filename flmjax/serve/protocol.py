"""The official FLM-Audio websocket protocol (ARCHITECTURE.md §9): message kinds, Opus streams,
the settings JSON, and the monologue text stream.

Every binary message starts with its kind byte: 0x00 handshake (server -> client, once the
session's slot is ready), 0x01 Ogg/Opus audio at 24 kHz (both ways), 0x02 UTF-8 monologue text
(server -> client; WAIT is not sent, b"\\x02\\n" ends a sentence).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import sphn

from flmjax.decode import SamplingConfig

HANDSHAKE, AUDIO, TEXT = 0, 1, 2
SENTENCE_END = b'\x02\n'
SAMPLE_RATE = 24000


class OpusWriter:
  """float32 pcm frames -> Ogg/Opus bytes; sphn 0.2.x returns them, 0.1.x (the official pin)
  buffers them for read_bytes. Same bytes on the wire either way."""

  def __init__(self, sample_rate: int = SAMPLE_RATE):
    self._writer = sphn.OpusStreamWriter(sample_rate)
    self._legacy = hasattr(self._writer, 'read_bytes')

  def encode(self, pcm: np.ndarray) -> bytes:
    out = self._writer.append_pcm(np.ascontiguousarray(pcm, np.float32))
    return bytes(self._writer.read_bytes()) if self._legacy else bytes(out)


class OpusReader:
  """Ogg/Opus bytes -> float32 pcm (ValueError on a malformed stream)."""

  def __init__(self, sample_rate: int = SAMPLE_RATE):
    self._reader = sphn.OpusStreamReader(sample_rate)
    self._legacy = hasattr(self._reader, 'read_pcm')

  def decode(self, data: bytes) -> np.ndarray:
    out = self._reader.append_bytes(data)
    if self._legacy:
      out = self._reader.read_pcm()
    return np.zeros((0,), np.float32) if out is None else np.asarray(out, np.float32).reshape(-1)


# The official server sets these LMGen attributes from the JSON body of POST /api/settings; ours
# maps them onto SamplingConfig fields (use_sampling=False is greedy).
SETTINGS_KEYS = {
    'use_sampling': 'greedy', 'temp_audio': 'temp_audio', 'temp_text': 'temp_text',
    'top_k_audio': 'top_k_audio', 'top_k_text': 'top_k_text',
    'top_p_audio': 'top_p_audio', 'top_p_text': 'top_p_text',
    'repetition_penalty_audio': 'repetition_penalty_audio',
    'repetition_penalty_text': 'repetition_penalty_text',
    'repetition_penalty_window_audio': 'window_audio',
    'repetition_penalty_window_text': 'window_text',
}


def apply_settings(base: SamplingConfig, settings) -> SamplingConfig:
  """The official settings JSON (an object of SETTINGS_KEYS) over `base`; ValueError naming the
  bad key or value."""
  if not isinstance(settings, dict):
    raise ValueError(f'settings must be a JSON object, got {type(settings).__name__}')
  fields = {}
  for key, value in settings.items():
    if key not in SETTINGS_KEYS:
      raise ValueError(f'unknown setting {key!r}; known: {", ".join(sorted(SETTINGS_KEYS))}')
    field = SETTINGS_KEYS[key]
    kind = type(getattr(base, field))
    if kind is bool:
      if not isinstance(value, bool):
        raise ValueError(f'{key} must be true or false, got {value!r}')
      fields[field] = (not value) if key == 'use_sampling' else value
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or (
        kind is int and value != int(value)):
      raise ValueError(f'{key} must be a number{" (integer)" if kind is int else ""}, '
                       f'got {value!r}')
    else:
      fields[field] = kind(value)
  return dataclasses.replace(base, **fields)  # SamplingConfig checks the ranges


def settings_json(sampling: SamplingConfig) -> dict:
  """A SamplingConfig as the official settings keys."""
  out = {key: getattr(sampling, field) for key, field in SETTINGS_KEYS.items()}
  out['use_sampling'] = not sampling.greedy
  return out


class TextStream:
  """Monologue text ids -> 0x02 messages, as the official server streams them: specials skipped,
  text sent as it grows, a WAIT after text ends the sentence (b"\\x02\\n").

  Without a tokenizer each id shows as <id> (the tiny models have no vocabulary).
  """

  def __init__(self, cfg, tokenizer=None):
    self.wait = cfg.text_wait_id
    self.skip = {cfg.text_bos_id, cfg.text_eos_id}
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.shown = ''

  def _render(self) -> str:
    if self.tokenizer is None:
      return ''.join(f'<{i}>' for i in self.ids)
    vocab = self.tokenizer.vocab_size
    return self.tokenizer.decode([i for i in self.ids if i < vocab])

  def add(self, token: int) -> list[bytes]:
    """One frame's text token -> the messages to send (possibly none)."""
    if token in self.skip:
      return []
    if token == self.wait:
      if not self.ids:
        return []
      self.ids, self.shown = [], ''
      return [SENTENCE_END]
    self.ids.append(token)
    text = self._render()
    new = text[len(self.shown):] if text.startswith(self.shown) else text
    self.shown = text
    return [bytes([TEXT]) + new.encode('utf-8')] if new else []

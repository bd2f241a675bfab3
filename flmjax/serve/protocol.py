"""The official FLM-Audio websocket protocol (docs/architecture.md §9): message kinds, Opus streams,
the settings JSON, and the monologue text stream.

Every binary message starts with its kind byte: 0x00 handshake (server -> client, once the
session's slot is ready), 0x01 Ogg/Opus audio at 24 kHz (both ways), 0x02 UTF-8 monologue text
(server -> client; WAIT is not sent, b"\\x02\\n" ends a sentence). A client that connects with
`?codec=pcm16` (the browser page) sends and gets 0x01 as raw int16 samples instead of Ogg/Opus.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import sphn

from flmjax.codec.base import SAMPLE_RATE  # noqa: F401 (protocol.SAMPLE_RATE: the wire rate)
from flmjax.data.tokenizer import StreamingText
from flmjax.decode import SamplingConfig
from flmjax.errors import FlmjaxError

HANDSHAKE, AUDIO, TEXT = 0, 1, 2
SENTENCE_END = b'\x02\n'


class OpusWriter:
  """float32 pcm frames -> Ogg/Opus bytes; sphn 0.2.x returns them, 0.1.x (the official pin)
  buffers them for read_bytes. Same bytes on the wire either way."""

  def __init__(self, sample_rate: int = SAMPLE_RATE):
    self._writer = sphn.OpusStreamWriter(sample_rate)
    self._legacy = hasattr(self._writer, 'read_bytes')

  def encode(self, pcm: np.ndarray) -> bytes:
    out = self._writer.append_pcm(np.ascontiguousarray(pcm, np.float32))
    return bytes(self._writer.read_bytes()) if self._legacy else bytes(out)


class CorruptAudioError(FlmjaxError, ValueError):
  """Ogg/Opus bytes that fail a check: a page's CRC, or pcm with NaN or infinite samples. Loud
  audio is no corruption: it is clipped (`clip`), never refused."""


def clip(pcm: np.ndarray) -> tuple[np.ndarray, float]:
  """pcm -> (pcm clipped to [-1, 1], its peak before), as any player would play it. Opus
  overshoots full scale slightly, a loud microphone or a model's reply by more; either way the
  level is the speaker's, not a sign of corruption."""
  peak = float(np.abs(pcm).max()) if pcm.size else 0.0
  return (np.clip(pcm, -1.0, 1.0) if peak > 1.0 else pcm), peak


_BIT_REVERSED = bytes(int(f'{i:08b}'[::-1], 2) for i in range(256))


def ogg_crc(page: bytes) -> int:
  """The Ogg CRC-32 (polynomial 0x04C11DB7, not reflected, initial value 0, no final xor), from
  zlib's reflected CRC-32 on bit-reversed bytes: C speed, no table in Python."""
  reflected = zlib.crc32(page.translate(_BIT_REVERSED)) ^ zlib.crc32(bytes(len(page)))
  return int(f'{reflected:032b}'[::-1], 2)


class OggPages:
  """Checks each complete Ogg page's CRC as bytes arrive (pages may span messages); sphn's reader
  does not, and a corrupted page would decode into noise."""

  def __init__(self):
    self._pending = b''

  def check(self, data: bytes) -> None:
    buf, at = self._pending + data, 0
    while len(buf) - at >= 27 and buf[at : at + 4] == b'OggS':
      segments = buf[at + 27 : at + 27 + buf[at + 26]]
      end = at + 27 + buf[at + 26] + sum(segments)
      if len(segments) < buf[at + 26] or end > len(buf):
        break  # the rest of this page comes in a later message
      page = buf[at:end]
      crc = int.from_bytes(page[22:26], 'little')
      if ogg_crc(page[:22] + b'\0\0\0\0' + page[26:]) != crc:
        seq = int.from_bytes(page[18:22], 'little')
        raise CorruptAudioError(f'Ogg page {seq} fails its CRC check')
      at = end
    rest = buf[at:]
    # Bytes that are no Ogg page at all are sphn's to report; a page is at most 65,307 bytes.
    self._pending = rest if rest[:4] == b'OggS'[: len(rest)] and len(rest) < 65536 else b''


class OpusReader:
  """Ogg/Opus bytes -> float32 pcm in [-1, 1]. CorruptAudioError on a page that fails its CRC or
  decodes into non-finite pcm; ValueError (sphn) on a malformed stream. Louder pcm is clipped:
  `clipped` counts the messages that were, `peak` is the loudest sample seen before clipping."""

  def __init__(self, sample_rate: int = SAMPLE_RATE):
    self._reader = sphn.OpusStreamReader(sample_rate)
    self._legacy = hasattr(self._reader, 'read_pcm')
    self._pages = OggPages()
    self.clipped, self.peak = 0, 0.0

  def decode(self, data: bytes) -> np.ndarray:
    self._pages.check(data)
    out = self._reader.append_bytes(data)
    if self._legacy:
      out = self._reader.read_pcm()
    pcm = np.zeros((0,), np.float32) if out is None else np.asarray(out, np.float32).reshape(-1)
    if pcm.size:
      if not np.isfinite(pcm).all():
        raise CorruptAudioError('decoded audio holds NaN or infinite samples')
      pcm, peak = clip(pcm)
      self.clipped += peak > 1.0
      self.peak = max(self.peak, peak)
    return pcm


class Pcm16Writer:
  """float32 pcm frames -> little-endian int16 bytes (the `?codec=pcm16` variant of 0x01, which
  the page uses: browsers have no Ogg/Opus encoder). Clips to [-1, 1)."""

  def encode(self, pcm: np.ndarray) -> bytes:
    q = np.clip(np.rint(np.asarray(pcm, np.float32) * 32768.0), -32768, 32767)
    return q.astype('<i2').tobytes()


class Pcm16Reader:
  """Little-endian int16 bytes -> float32 pcm (sample / 32768); ValueError on an odd length.
  int16 cannot pass full scale: nothing is ever clipped."""

  clipped, peak = 0, 0.0

  def decode(self, data: bytes) -> np.ndarray:
    if len(data) % 2:
      raise ValueError(f'pcm16 payload of {len(data)} bytes: not whole int16 samples')
    return np.frombuffer(data, '<i2').astype(np.float32) / 32768.0


CODECS = {'opus': (OpusReader, OpusWriter), 'pcm16': (Pcm16Reader, Pcm16Writer)}


# The official server sets these LMGen attributes from the JSON body of POST /api/settings; ours
# maps them onto SamplingConfig fields (use_sampling=False is greedy).
SETTINGS_KEYS = {
  'use_sampling': 'greedy',
  'temp_audio': 'temp_audio',
  'temp_text': 'temp_text',
  'top_k_audio': 'top_k_audio',
  'top_k_text': 'top_k_text',
  'top_p_audio': 'top_p_audio',
  'top_p_text': 'top_p_text',
  'repetition_penalty_audio': 'repetition_penalty_audio',
  'repetition_penalty_text': 'repetition_penalty_text',
  'repetition_penalty_window_audio': 'penalty_window_audio',
  'repetition_penalty_window_text': 'penalty_window_text',
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
    elif (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or (kind is int and value != int(value))
    ):
      raise ValueError(
        f'{key} must be a number{" (integer)" if kind is int else ""}, got {value!r}'
      )
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
    self.sentence = StreamingText(tokenizer)

  def add(self, token: int) -> list[bytes]:
    """One frame's text token -> the messages to send (possibly none)."""
    if token in self.skip:
      return []
    if token == self.wait:
      if not self.sentence.ids:
        return []
      self.sentence.clear()
      return [SENTENCE_END]
    new, _ = self.sentence.append(token)
    return [bytes([TEXT]) + new.encode('utf-8')] if new else []

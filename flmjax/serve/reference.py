"""The cross-talk reference: what a session must receive, computed offline through the same
jitted calls (FramePipeline) from the input audio the server decoded.

A session's replies depend only on its own input, so each session's text and reply audio must
equal this reference exactly; a row mixed up with another slot's would not.
"""

from __future__ import annotations

import numpy as np

from flmjax.decode import SamplingConfig
from flmjax.serve import protocol
from flmjax.serve.pipeline import FramePipeline


def replay(
  pipeline: FramePipeline,
  inputs: dict[int, np.ndarray],
  sampling: SamplingConfig | None = None,
  seeds=None,
) -> dict[int, tuple]:
  """Offline reference: feeds inputs {slot: pcm float32 [frames*S]} from their first frame, all
  slots starting together, through the same jitted calls -> {slot: (text ids [n], pcm [n*S])}
  of the valid steps. A fresh pipeline of the server's shape gives the server's numbers."""
  S, B = pipeline.frame_size, pipeline.slots
  mask = np.zeros((B,), bool)
  mask[list(inputs)] = True
  pipeline.start(mask, sampling, seeds=seeds)
  frames = max(len(x) // S for x in inputs.values())
  texts = {s: [] for s in inputs}
  pcms = {s: [] for s in inputs}
  for t in range(frames):
    batch = np.zeros((B, S), np.float32)
    for s, x in inputs.items():
      if (t + 1) * S <= len(x):
        batch[s] = x[t * S : (t + 1) * S]
    out = pipeline.step(batch)
    for s, x in inputs.items():
      if (t + 1) * S <= len(x) and out.valid[s]:
        texts[s].append(int(out.text[s]))
        pcms[s].append(out.pcm[s])
  pipeline.stop(mask)
  return {
    s: (
      np.asarray(texts[s], np.int32),
      np.concatenate(pcms[s]) if pcms[s] else np.zeros((0,), np.float32),
    )
    for s in inputs
  }


def expected_reply(
  cfg, text_ids: np.ndarray, pcm: np.ndarray, tokenizer=None, codec: str = 'opus'
) -> tuple:
  """Offline (text ids [n], pcm [n*S]) -> (the 0x02 text a client joins, the reply pcm it
  decodes): the server's TextStream, clipping and per-frame encoding (Opus or pcm16), then a
  fresh decoder."""
  make_reader, make_writer = protocol.CODECS[codec]
  stream, writer, reader = protocol.TextStream(cfg, tokenizer), make_writer(), make_reader()
  text = ''.join(m[1:].decode('utf-8') for i in text_ids for m in stream.add(int(i)))
  S = len(pcm) // max(len(text_ids), 1)
  frames = [  # clipped, as the server plays a reply
    reader.decode(writer.encode(protocol.clip(pcm[t * S : (t + 1) * S])[0]))
    for t in range(len(text_ids))
  ]
  return text, (np.concatenate(frames) if frames else np.zeros((0,), np.float32))


def mismatches(
  conv,
  cfg,
  text_ids: np.ndarray,
  pcm: np.ndarray,
  frames: int | None = None,
  tokenizer=None,
  codec: str = 'opus',
) -> list[str]:
  """Where a client's Conversation differs from the offline reference (text ids [n], pcm [n*S],
  from `replay`) over its first `frames` reply frames (default: all n, the replies to its real
  input); [] if equal. The client's text must begin with the reference text of those frames
  (frames after its input ended, fed as silence, may have added more)."""
  S = len(pcm) // max(len(text_ids), 1)
  n = len(text_ids) if frames is None else frames
  problems = []
  if n > len(text_ids):
    problems.append(f'compared {n} reply frames, the reference has {len(text_ids)}')
    n = len(text_ids)
  if conv.frames_received < n:
    problems.append(f'received {conv.frames_received} reply frames, expected {n}')
    n = conv.frames_received
  text, reply = expected_reply(cfg, text_ids[:n], pcm[: n * S], tokenizer, codec)
  got = conv.reply_pcm[: n * S].reshape(n, S)
  differ = np.flatnonzero(np.any(got != reply.reshape(n, S), axis=1))
  if differ.size:
    problems.append(f'reply audio differs in {differ.size} of {n} frames (first: {differ[0]})')
  if not conv.text.startswith(text):
    problems.append(f'text differs: got {conv.text[:60]!r}..., expected {text[:60]!r}...')
  return problems

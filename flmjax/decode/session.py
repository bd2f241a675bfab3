"""One offline full-duplex session on a model: `load_model` (an official checkpoint or a
training run) and `run_session` (user codes in, the model's frames and transcript out)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from flmjax.errors import FlmjaxError


def load_model(
  path: str, dtype: str | None = None, mesh=None, base: str | None = None, mimi_flag=None
):
  """An official-layout dir through load_official (in `dtype`, default the checkpoint's; with a
  mesh, each device reads its own block), else an orbax training checkpoint: a LoRA run is
  merged into its base (`base`, the official checkpoint it trained on, where its init_from has
  moved; else its init_from or seed). mimi_flag: the command's flag for a Mimi codec, named
  when `path` is one."""
  import flmjax
  from flmjax.checkpoint import kinds

  problem = kinds.misplaced(path, (kinds.OFFICIAL, kinds.RUN, kinds.LORA_RUN), mimi_flag=mimi_flag)
  if problem:
    raise ValueError(f'`checkpoint` {problem}')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'`checkpoint` {path}: no such directory')
  if os.path.exists(os.path.join(path, 'config.json')):
    if base is not None:
      raise ValueError(
        f'`base` {base}: `checkpoint` {path} is an official checkpoint; `base` '
        'names the base of a LoRA training run'
      )
    return flmjax.load_official(path, dtype=dtype, mesh=mesh)
  if any(f.endswith('.safetensors') for f in os.listdir(path)):
    raise FileNotFoundError(
      f'`checkpoint` {path}: safetensors weights without config.json; put '
      'the config.json of the same release (or export) beside them'
    )
  if not (
    os.path.isdir(os.path.join(path, 'checkpoints'))
    or any(name.isdigit() for name in os.listdir(path))
  ):
    raise FileNotFoundError(
      f'`checkpoint` {path}: neither an official checkpoint (config.json + '
      'safetensors) nor a training run (orbax steps under checkpoints/)'
    )
  from flmjax.checkpoint.restore import require_lora, restore_model

  if base is not None:  # before any weights are read
    require_lora(path, None, '`base`')
  return restore_model(path, base=base)[0]


class IncompleteSession(FlmjaxError, RuntimeError):
  """A session stopped early; `out` and `transcript` hold what was decoded until then."""

  def __init__(self, message: str, out: np.ndarray, transcript: str):
    super().__init__(message)
    self.out, self.transcript = out, transcript


class Transcript:
  """Prints the monologue as it streams: WAITs and specials skipped, text decoded incrementally
  (a re-rendered beginning starts a new line)."""

  def __init__(self, cfg, tokenizer=None, stream=None):
    from flmjax.data.tokenizer import StreamingText

    self.specials = (cfg.text_wait_id, cfg.text_bos_id, cfg.text_eos_id)
    self.stream = stream or sys.stdout
    self._text = StreamingText(tokenizer)

  def add(self, token: int) -> None:
    if token in self.specials:
      return
    new, continues = self._text.append(token)
    self.stream.write(new if continues else '\n' + new)
    self.stream.flush()

  def text(self) -> str:
    return self._text.text()


def run_session(
  model,
  user: np.ndarray,
  sampling,
  *,
  seed: int = 0,
  max_len: int | None = None,
  overflow: str = 'error',
  tail: int = 0,
  tokenizer=None,
  stream=None,
) -> tuple[np.ndarray, str]:
  """One offline session: user codes [C, F] (+ `tail` PAD frames) -> (model frames [1+C, F'] =
  [text; speak codes], the transcript). Prints the transcript to `stream` as it goes."""
  from flmjax.decode import SessionOverflowError, StreamingDecoder

  cfg = model.cfg
  frames = user.shape[1] + tail
  dec = StreamingDecoder(model, sampling, max_len=max_len or max(frames, 1), overflow=overflow)
  state = dec.init(1, seed=seed)
  pad = np.full((cfg.num_codebooks,), cfg.audio_pad_id, np.int32)
  transcript = Transcript(cfg, tokenizer, stream)
  outputs, start = [], time.perf_counter()
  stack = lambda: (
    np.stack(outputs, axis=1) if outputs else np.zeros((1 + cfg.num_codebooks, 0), np.int32)
  )
  for t in range(frames):
    frame = user[:, t] if t < user.shape[1] else pad
    try:
      state, out, valid = dec.step(state, frame[None])
    except SessionOverflowError:
      transcript.stream.write('\n')
      raise IncompleteSession(
        f'the session reached `max_len` {dec.max_len} frames at user frame {t} of {frames}; '
        f'raise `max_len` or pass `overflow` slide',
        stack(),
        transcript.text(),
      ) from None
    if bool(valid[0]):
      row = np.asarray(out)[0]
      outputs.append(row)
      transcript.add(int(row[0]))
  elapsed = time.perf_counter() - start
  out = stack()
  transcript.stream.write(
    f'\n[{frames} frames in {elapsed:.2f} s '
    f'({1000 * elapsed / max(frames, 1):.1f} ms/frame incl. compile); '
    f'{out.shape[1]} model frames]\n'
  )
  return out, transcript.text()

"""A session's files: the user's side read from codes (.npy) or audio (`read_user`), and the
model's side written as codes, text ids, the transcript and reply.wav (`write_outputs`)."""

from __future__ import annotations

import os

import numpy as np

OUTPUTS = ('model_codes.npy', 'text_ids.npy', 'transcript.txt', 'reply.wav')
AUDIO_EXTENSIONS = ('.wav', '.flac', '.ogg')  # read by soundfile


def read_user(
  path: str, num_codebooks: int, pad_id: int, channel: int | None = None, codec=None
) -> tuple[np.ndarray, object]:
  """-> (codes int32 [C, F], codec or None). Audio goes through `codec`, by default the toy one."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'`user` {path}: no such file')
  ext = os.path.splitext(path)[1].lower()
  if ext not in AUDIO_EXTENSIONS + ('.npy',):
    raise ValueError(f'`user` {path}: give codes as a .npy or audio as one of {AUDIO_EXTENSIONS}')
  if ext in AUDIO_EXTENSIONS:
    from flmjax.codec.toy import ToyCodec
    from flmjax.data.audio import read_audio

    codec = codec or ToyCodec()
    (wave,) = read_audio(path, channel=channel, target_rate=codec.sample_rate)  # [S]
    if wave.shape[0] < codec.frame_size:
      raise ValueError(
        f'`user` {path}: {wave.shape[0]} samples at {codec.sample_rate} Hz, shorter '
        f'than one {1000 * codec.frame_size // codec.sample_rate} ms frame'
      )
    return np.asarray(codec.encode(wave), np.int32), codec
  if channel is not None:
    raise ValueError(f'`channel` applies to an audio `user`, not {path}')
  from flmjax.data.manifest import read_npy

  codes = read_npy(path)
  if codes.ndim == 3 and codes.shape[0] == 1:
    codes = codes[0]
  if codes.ndim == 2 and codes.shape[1] == num_codebooks and codes.shape[0] != num_codebooks:
    raise ValueError(
      f'`user` {path}: codes of shape {codes.shape} look transposed; save them as '
      f'[{num_codebooks}, frames] (codes.T)'
    )
  if codes.ndim != 2 or codes.shape[0] != num_codebooks:
    raise ValueError(
      f'`user` {path}: expected codes of shape [{num_codebooks}, frames], got {codes.shape}'
    )
  if codes.shape[1] == 0:
    raise ValueError(f'`user` {path}: the codes hold 0 frames (shape {codes.shape})')
  if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() > pad_id:
    raise ValueError(
      f'`user` {path}: codes must be integers in 0..{pad_id} (PAD), got dtype '
      f'{codes.dtype}, range {codes.min()}..{codes.max()}'
    )
  return codes.astype(np.int32), codec


def write_outputs(out_dir: str, out: np.ndarray, transcript: str, codec) -> str:
  os.makedirs(out_dir, exist_ok=True)
  np.save(os.path.join(out_dir, 'model_codes.npy'), out[1:])
  np.save(os.path.join(out_dir, 'text_ids.npy'), out[0])
  with open(os.path.join(out_dir, 'transcript.txt'), 'w') as f:
    f.write(transcript + '\n')
  if codec is not None and out.shape[1]:
    import soundfile

    path = os.path.join(out_dir, 'reply.wav')
    soundfile.write(path + '.tmp', codec.decode(out[1:]), codec.sample_rate, format='WAV')
    os.replace(path + '.tmp', path)
  return (
    f'{out_dir}/model_codes.npy [{out.shape[0] - 1}, {out.shape[1]}], text_ids.npy, '
    'transcript.txt' + (', reply.wav' if codec is not None and out.shape[1] else '')
  )

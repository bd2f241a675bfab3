"""Text tokenizers behind one small interface.

- Qwen2's byte-level BPE (`tokenizer.json`, through `tokenizers`) for real FLM-Audio weights.
- SentencePiece (`.model`) for the embedded default, trained deterministically on the synthetic
  corpus's text.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
  def __init__(self, path: str | os.PathLike):
    import sentencepiece as spm

    self.path = str(path)
    self._sp = spm.SentencePieceProcessor(model_file=self.path)
    self.vocab_size = int(self._sp.get_piece_size())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: list[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  """Byte-level BPE from a Hugging Face `tokenizer.json` (Qwen2's for FLM-Audio 8B)."""

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer as _Tok

    self.path = str(path)
    self._tok = _Tok.from_file(self.path)
    self.vocab_size = int(self._tok.get_vocab_size())

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model')  # as `flmjax export` writes them


def find_tokenizer(*folders: str) -> str | None:
  """The first tokenizer file (TOKENIZER_FILES, in that order) in the first folder that holds
  one, or None."""
  for folder in folders:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
  return None


def resolve_tokenizer(path: str | os.PathLike | None, *folders: str) -> Tokenizer | None:
  """The tokenizer at `path` when given, else the first one beside `folders` (find_tokenizer),
  else None."""
  found = path or find_tokenizer(*folders)
  return load_tokenizer(found) if found else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """SentencePiece for `*.model`, the `tokenizers` library for `tokenizer.json`."""
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'tokenizer: no file at {path!r}')
  if not path.endswith(('.model', '.json')):
    raise ValueError(f'tokenizer: {path!r} is neither a SentencePiece .model nor a tokenizer.json')
  try:
    return SentencePieceTokenizer(path) if path.endswith('.model') else HFTokenizer(path)
  except Exception as e:  # both libraries raise bare RuntimeError/Exception for a bad file
    raise ValueError(
      f'tokenizer: {path!r} is not a readable '
      f'{"SentencePiece model" if path.endswith(".model") else "tokenizer.json"} '
      f'({str(e).splitlines()[0] if str(e) else type(e).__name__})'
    ) from None


def train_sentencepiece(
  texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int
) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece model deterministically (one thread, no sampling or shuffling).

  Ids are 0..vocab_size-1 with unk = 0 and no BOS/EOS/PAD pieces: FLM-Audio's specials live in the
  model config, above the tokenizer's range.
  """
  import sentencepiece as spm

  model_path = str(model_path)
  if not model_path.endswith('.model'):
    raise ValueError(f'train_sentencepiece: {model_path!r} must end in .model')
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(list(texts)),
    model_writer=proto,
    vocab_size=vocab_size,
    model_type='bpe',
    character_coverage=1.0,
    num_threads=1,
    hard_vocab_limit=False,
    shuffle_input_sentence=False,
    input_sentence_size=0,
    unk_id=0,
    bos_id=-1,
    eos_id=-1,
    pad_id=-1,
    minloglevel=2,
  )
  with open(model_path, 'wb') as f:
    f.write(proto.getvalue())
  return SentencePieceTokenizer(model_path)


class StreamingText:
  """Text ids as they stream in, rendered incrementally: each `append` returns what to show next.
  Without a tokenizer each id shows as <id> (the tiny models have no vocabulary); ids past the
  tokenizer's vocabulary are model-only specials and show as nothing."""

  def __init__(self, tokenizer: Tokenizer | None = None):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.shown = ''

  def text(self) -> str:
    if self.tokenizer is None:
      return ''.join(f'<{i}>' for i in self.ids)
    vocab = self.tokenizer.vocab_size
    return self.tokenizer.decode([i for i in self.ids if i < vocab])

  def append(self, token: int) -> tuple[str, bool]:
    """-> (the text to show now, whether it continues what was shown). A detokenizer may render
    earlier text differently once more ids arrive (byte-level BPE, SentencePiece spaces); then
    the whole text comes back with False."""
    self.ids.append(token)
    text = self.text()
    continues = text.startswith(self.shown)
    new = text[len(self.shown) :] if continues else text
    self.shown = text
    return new, continues

  def clear(self) -> None:
    self.ids, self.shown = [], ''

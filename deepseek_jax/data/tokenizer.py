"""Tokenizers: raw UTF-8 bytes (the default) or a byte-level BPE trained here on the train split.

Both say how many UTF-8 bytes each token stands for (`bytes_per_token`, [V]), so evaluation can
report bits per byte, a figure that does not depend on the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

TOKENIZER_FILE = 'tokenizer.json'


class Tokenizer(Protocol):
  vocab_size: int
  bytes_per_token: np.ndarray  # [V] int32

  def encode(self, text: str) -> np.ndarray: ...
  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """Token i is byte i of the UTF-8 encoding: no training, no file, every token one byte."""

  vocab_size = 256

  def __init__(self):
    self.bytes_per_token = np.ones((self.vocab_size,), np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(text) for text in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f'byte token ids must lie in [0, 256), got {ids.min()}..{ids.max()}')
    # A window may cut a multi-byte character: show it as U+FFFD rather than fail.
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class BpeTokenizer:
  """GPT-2 style byte-level BPE from `tokenizers`: every byte is in the base alphabet, so any text
  encodes without an unknown token and decodes back exactly."""

  def __init__(self, tokenizer: Any):
    from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel
    self._tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths = np.zeros((self.vocab_size,), np.int32)
    for token, index in tokenizer.get_vocab().items():
      # Byte-level BPE spells each byte as one printable character of its 256-letter alphabet.
      if not set(token) <= alphabet:
        raise ValueError(f'token {token!r} is not spelled in the byte-level alphabet')
      lengths[index] = len(token)
    self.bytes_per_token = lengths

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int) -> BpeTokenizer:
    # pylint: disable-next=import-outside-toplevel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet):
      raise ValueError(f'a byte-level BPE needs vocab_size >= {len(alphabet)}, got {vocab_size}')
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return cls(tokenizer)

  @classmethod
  def load(cls, path: str) -> BpeTokenizer:
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    return cls(Tokenizer.from_file(path))

  def save(self, path: str) -> None:
    # Write then rename, so a reader never sees half a file.
    tmp = f'{path}.tmp.{os.getpid()}'
    self._tokenizer.save(tmp)
    os.replace(tmp, path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self._tokenizer.encode_batch(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def make_tokenizer(data_cfg: Any, workdir: str | None, train_docs: Sequence[tuple[str, str]],
                   vocab_size: int | None = None) -> Tokenizer:
  """The tokenizer named by `data.tokenizer` ('byte' default, or 'bpe').

  'bpe' reuses `<workdir>/tokenizer.json` when it exists (a resumed run must keep its ids), else
  trains a BPE of `vocab_size` tokens (the model's) on `train_docs` and saves it there.
  `vocab_size`, when given, must hold every token id.
  """
  kind = data_cfg.get('tokenizer', 'byte')
  if kind == 'byte':
    tokenizer = ByteTokenizer()
  elif kind == 'bpe':
    path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
    if path and os.path.exists(path):
      tokenizer = BpeTokenizer.load(path)
    elif vocab_size is None:
      raise ValueError("data.tokenizer='bpe' needs a vocab size to train to (model.vocab_size)")
    else:
      tokenizer = BpeTokenizer.train([text for _, text in train_docs], vocab_size)
      if path:
        os.makedirs(workdir, exist_ok=True)
        tokenizer.save(path)
  else:
    raise ValueError(f"data.tokenizer must be 'byte' or 'bpe', got {kind!r}")
  if vocab_size is not None and tokenizer.vocab_size > vocab_size:
    raise ValueError(f'data.tokenizer={kind!r} has {tokenizer.vocab_size} tokens, more than '
                     f'model.vocab_size={vocab_size}')
  return tokenizer

"""Tokenizers: raw UTF-8 bytes (the default), a byte-level BPE trained here on the train split,
or the `tokenizer.json` that came with pretrained weights (any `tokenizers` file, DeepSeek's own
with its special tokens included).

Each says how many UTF-8 bytes each token stands for (`bytes_per_token`, [V]), so evaluation can
report bits per byte, a figure that does not depend on the tokenizer.
"""

from __future__ import annotations

import json
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


class FileTokenizer:
  """Any `tokenizers` tokenizer.json, e.g. a pretrained checkpoint's: text is encoded without
  the special tokens a post-processor would add (BOS), as the training stream has none; a
  special token written in the text is still read as that token."""

  def __init__(self, tokenizer: Any):
    self._tokenizer = tokenizer
    vocab = tokenizer.get_vocab()  # added (special) tokens included
    self.vocab_size = max(vocab.values()) + 1
    self.bytes_per_token = _token_bytes(tokenizer, vocab, self.vocab_size)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    # Special tokens are shown: encode reads them in the text, and bytes_per_token counts them.
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                  skip_special_tokens=False)


def _token_bytes(tokenizer: Any, vocab: dict[str, int], size: int) -> np.ndarray:
  """[size] int32: a byte-level model's token spells one byte per character; an added token
  (special tokens match their literal text) and any other model's token count the UTF-8 bytes
  of their decoded text (ids no token has count 0)."""
  from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel
  decoder = json.loads(tokenizer.to_str()).get('decoder') or {}
  byte_level = 'ByteLevel' in {decoder.get('type')} | {
      d.get('type') for d in decoder.get('decoders') or ()}
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  added = set(tokenizer.get_added_tokens_decoder())
  lengths = np.zeros((size,), np.int32)
  for token, index in vocab.items():
    if byte_level and index not in added and set(token) <= alphabet:
      lengths[index] = len(token)
    else:
      text = token if index in added else tokenizer.decode([index], skip_special_tokens=False)
      lengths[index] = len(text.encode('utf-8'))
  return lengths


def load_file(path: str) -> BpeTokenizer | FileTokenizer:
  """A tokenizer.json: a `BpeTokenizer` when every token is spelled in the byte-level alphabet
  (the ones `BpeTokenizer.train` writes), else a `FileTokenizer`."""
  from tokenizers import Tokenizer as HfTokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = HfTokenizer.from_file(path)
  try:
    return BpeTokenizer(tokenizer)
  except ValueError:  # special tokens, or another model's pieces
    return FileTokenizer(tokenizer)


def make_tokenizer(data_cfg: Any, workdir: str | None, train_docs: Sequence[tuple[str, str]],
                   vocab_size: int | None = None) -> Tokenizer:
  """The tokenizer named by `data.tokenizer` ('byte' default, 'bpe' or 'checkpoint').

  'bpe' reuses `<workdir>/tokenizer.json` when it exists (a resumed run must keep its ids), else
  trains a BPE of `vocab_size` tokens (the model's) on `train_docs` and saves it there.
  'checkpoint' only reads `<workdir>/tokenizer.json`: the pretrained weights' own, which
  `experiments.convert` and a `config.init_from` start copy there. `vocab_size`, when given, must
  hold every token id.
  """
  kind = data_cfg.get('tokenizer', 'byte')
  path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
  if kind == 'byte':
    tokenizer = ByteTokenizer()
  elif kind == 'checkpoint':
    if not (path and os.path.isfile(path)):
      raise ValueError(
          f"data.tokenizer='checkpoint': {path or TOKENIZER_FILE} not found. It is the "
          'tokenizer of pretrained weights: start with --config.init_from=hf:<dir> (or a '
          'workdir), or write this workdir with `python -m experiments.convert`')
    tokenizer = load_file(path)
  elif kind == 'bpe':
    if path and os.path.exists(path):
      tokenizer = load_file(path)
    elif vocab_size is None:
      raise ValueError("data.tokenizer='bpe' needs a vocab size to train to (model.vocab_size)")
    else:
      tokenizer = BpeTokenizer.train([text for _, text in train_docs], vocab_size)
      if path:
        os.makedirs(workdir, exist_ok=True)
        tokenizer.save(path)
  else:
    raise ValueError(f"data.tokenizer must be 'byte', 'bpe' or 'checkpoint', got {kind!r}")
  if vocab_size is not None and tokenizer.vocab_size > vocab_size:
    raise ValueError(f'data.tokenizer={kind!r} has {tokenizer.vocab_size} tokens, more than '
                     f'model.vocab_size={vocab_size}')
  return tokenizer

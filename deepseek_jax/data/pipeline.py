"""Training text and the grain pipeline that feeds it to the model.

Documents come from `data.path` (files, a directory of *.txt, or a glob) or, by default, from
English that ships with Python: the pydoc topics and the docstrings of the standard library.
A stable hash of each document's name splits them into train and held-out parts. Each split
becomes one token stream (document, separator, document, ...) cut into windows of T + 1 tokens
that start every T tokens, so window i gives inputs tokens[iT : iT+T] and targets
tokens[iT+1 : iT+T+1] and every token after the first is predicted exactly once per epoch.

Training order: window ids are shuffled by grain (a new permutation every epoch, derived from
the seed), epochs repeat forever, and global batch s is the B windows at positions
[sB, (s+1)B) of that endless stream. Process p of P takes rows [pB/P, (p+1)B/P) of every
global batch, so the processes' local batches stacked in process order are exactly the
one-process batch. The iterator's state is grain's JSON-serialisable dict, saved with each
checkpoint.
"""

from __future__ import annotations

import ast
import functools
import glob
import math
import os
import sysconfig
import warnings
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from deepseek_jax.data import tokenizer as tokenizer_lib

Document = tuple[str, str]  # (name, text)

SEPARATOR = '\n\n'  # appended to every document in the token stream
CHUNK_CHARS = 8192  # user files are cut at line ends into documents of about this size
_SKIPPED_DIRS = frozenset({'test', 'tests', 'idlelib', 'site-packages', 'dist-packages',
                           '__pycache__'})
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# A few batches ahead on one thread: enough to hide the gather, no burden on small hosts.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


# ----------------------------------------------------------------------------- documents


def _docstrings(tree: ast.AST) -> list[str]:
  """Module, class and function docstrings in source order."""
  found, stack = [], [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, _DOCUMENTED):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        found.append(doc)
    # Definitions live in statements (and except/match arms), never inside expressions.
    children = [c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr)]
    stack.extend(reversed(children))
  return found


def _stdlib_documents() -> list[Document]:
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
    paths += [os.path.join(directory, f) for f in files if f.endswith('.py')]
  documents = []
  for path in sorted(paths):  # os.walk order depends on the file system
    try:
      with open(path, 'rb') as f, warnings.catch_warnings():
        warnings.simplefilter('ignore')  # old escape sequences warn on newer Pythons
        tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, OSError, RecursionError):
      continue
    docs = _docstrings(tree)
    if docs:
      name = 'stdlib/' + os.path.relpath(path, root).replace(os.sep, '/')
      documents.append((name, SEPARATOR.join(docs)))
  return documents


@functools.lru_cache(maxsize=1)
def _embedded_corpus() -> tuple[Document, ...]:
  try:
    from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  except ImportError:  # some distributions split pydoc_data into another package
    topics = {}
  documents = [(f'pydoc/{name}', topics[name]) for name in sorted(topics)]
  return tuple(documents + _stdlib_documents())


def embedded_corpus() -> list[Document]:
  """Every pydoc topic, then one document per stdlib module holding its docstrings.

  About 2.2 MB in 670 documents on CPython 3.11; built once per process (a few seconds).
  """
  return list(_embedded_corpus())


def _chunks(name: str, text: str) -> list[Document]:
  """Line-aligned pieces of one file, so even a single file has something to hold out."""
  pieces, current, size = [], [], 0
  for line in text.splitlines(keepends=True):
    current.append(line)
    size += len(line)
    if size >= CHUNK_CHARS:
      pieces.append(''.join(current))
      current, size = [], 0
  if current:
    pieces.append(''.join(current))
  return [(f'{name}#{i}', piece) for i, piece in enumerate(pieces)]


def load_documents(path: str) -> list[Document]:
  """'' gives the embedded corpus; otherwise a file, a directory (its *.txt, recursively) or a glob.

  Files are read as UTF-8 (undecodable bytes become U+FFFD) in sorted order and cut into
  documents of about CHUNK_CHARS characters named `<file>#<k>`.
  """
  if not path:
    return embedded_corpus()
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(glob.escape(path), '**', '*.txt'), recursive=True))
    if not files:
      raise ValueError(f'data.path {path!r} is a directory without *.txt files')
  elif os.path.isfile(path):
    files = [path]
  else:
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
      raise ValueError(f'data.path {path!r} matches no file (not a file, directory or glob)')
  documents = []
  for file in files:
    with open(file, encoding='utf-8', errors='replace') as f:
      text = f.read()
    if text.strip():
      documents += _chunks(file, text)
  if not documents:
    raise ValueError(f'data.path {path!r}: all {len(files)} matched file(s) are empty')
  return documents


def is_heldout(name: str, heldout_fraction: float) -> bool:
  # crc32 is fixed across runs and hash seeds; a name's side never depends on the other documents.
  return zlib.crc32(name.encode('utf-8')) < heldout_fraction * 2**32


def split(documents: Sequence[Document],
          heldout_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
  """(train, held-out) by a stable hash of each name; each keeps the input order."""
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f'data.heldout_fraction must lie in [0, 1), got {heldout_fraction}')
  train = [d for d in documents if not is_heldout(d[0], heldout_fraction)]
  heldout = [d for d in documents if is_heldout(d[0], heldout_fraction)]
  return train, heldout


def tokenize_split(documents: Sequence[Document],
                   tokenizer: tokenizer_lib.Tokenizer) -> np.ndarray:
  """One int32 token stream: each document's tokens followed by the separator's."""
  separator = tokenizer.encode(SEPARATOR)
  pieces = []
  for ids in tokenizer.encode_batch([text for _, text in documents]):
    pieces += [ids, separator]
  return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros((0,), np.int32)


class Data(NamedTuple):
  tokenizer: tokenizer_lib.Tokenizer
  train_tokens: np.ndarray     # int32, the train stream
  heldout_tokens: np.ndarray   # int32, the held-out stream
  num_documents: tuple[int, int]  # (train, held-out)


def prepare(data_cfg: Any, workdir: str | None, vocab_size: int | None = None) -> Data:
  """Documents → split → tokenizer (trained on the train split only) → two token streams."""
  train_docs, heldout_docs = split(load_documents(data_cfg.get('path', '')),
                                   data_cfg.get('heldout_fraction', 0.05))
  if not train_docs:
    raise ValueError(f'data.path {data_cfg.get("path", "")!r}: no document left for training')
  tokenizer = tokenizer_lib.make_tokenizer(data_cfg, workdir, train_docs, vocab_size)
  return Data(tokenizer, tokenize_split(train_docs, tokenizer),
              tokenize_split(heldout_docs, tokenizer), (len(train_docs), len(heldout_docs)))


# ----------------------------------------------------------------------------- windows


def num_windows(num_tokens: int, seq_len: int) -> int:
  return max(num_tokens - 1, 0) // seq_len


def windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """{'inputs', 'targets'}: int32 [len(window_ids), T]; window i starts at token iT."""
  starts = np.asarray(window_ids, np.int64) * seq_len
  window = tokens[starts[:, None] + np.arange(seq_len + 1)]  # [B, T+1]
  return {'inputs': np.ascontiguousarray(window[:, :-1], np.int32),
          'targets': np.ascontiguousarray(window[:, 1:], np.int32)}


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside [0, {process_count})')
  if batch_size % process_count:
    raise ValueError(f'train.batch_size={batch_size} must divide by the {process_count} '
                     'processes')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _check_length(tokens: np.ndarray, seq_len: int, what: str) -> int:
  count = num_windows(len(tokens), seq_len)
  if count < 1:
    raise ValueError(f'the {what} split has {len(tokens)} tokens, fewer than one window of '
                     f'train.seq_len + 1 = {seq_len + 1}')
  return count


def shuffle_seed(seed: int) -> int:
  # grain reshuffles epoch e with seed + e, so seeds s and s+1 would share epochs: spread them.
  return zlib.crc32(f'deepseek-jax data {seed}'.encode())


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Endless grain MapDataset of this process's batches: element s is global batch s's rows."""
  rows = _local_rows(batch_size, process_index, process_count)
  count = _check_length(tokens, seq_len, 'training')
  order = grain.MapDataset.range(count).shuffle(seed=shuffle_seed(seed)).repeat()
  # Every process derives the whole global batch of window ids (B ints) and keeps its rows.
  return order.batch(batch_size).map(lambda ids: windows(tokens, ids[rows], seq_len))


def train_iterator(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """`next(it)` gives {'inputs', 'targets'}: int32 [batch_size / process_count, seq_len].

  `it.get_state()` is a JSON-serialisable dict; a fresh iterator given it with `set_state`
  continues with exactly the batches the saved one would have produced next.
  """
  dataset = train_dataset(tokens, seq_len, batch_size, seed, process_index, process_count)
  return iter(dataset.to_iter_dataset(_READ_OPTIONS))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The held-out windows in stream order, whole batches only, at most `max_batches`."""
  rows = _local_rows(batch_size, process_index, process_count)
  count = _check_length(tokens, seq_len, 'held-out') // batch_size
  if count < 1:
    raise ValueError(f'the held-out split has {len(tokens)} tokens, fewer than one batch of '
                     f'{batch_size} windows of {seq_len} + 1')
  if max_batches is not None:
    count = min(count, max_batches)
  ids = np.arange(count * batch_size).reshape(count, batch_size)
  return [windows(tokens, batch_ids[rows], seq_len) for batch_ids in ids]


def bits_per_byte(sum_nats: float, num_bytes: float) -> float:
  """Total cross-entropy (nats) over the UTF-8 bytes the predicted tokens stand for, in bits.

  num_bytes is the sum of `tokenizer.bytes_per_token[targets]` over the same targets.
  """
  if num_bytes <= 0:
    raise ValueError(f'bits per byte needs a positive byte count, got {num_bytes}')
  return float(sum_nats) / (math.log(2.0) * float(num_bytes))

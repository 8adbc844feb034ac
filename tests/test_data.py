"""The data pipeline against the token stream it is cut from.

References: the embedded corpus against the pydoc topics and a stdlib docstring as Python ships
them; the split against its own definition (a crc32 threshold); tokenizers against UTF-8
(round trip, bytes per token summing to the encoded length); windows against slices of a
synthetic stream whose token k is k, so a window's position in the stream can be read off it.
"""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

from deepseek_jax.data import pipeline as data
from deepseek_jax.data import tokenizer as tokenizer_lib

SEQ_LEN = 8
STREAM = np.arange(993, dtype=np.int32)  # token k is k: (993 - 1) // 8 = 124 windows
NUM_WINDOWS = 124
UNICODE_TEXT = 'Héllo wörld — 漢字 🙂\n\n\ttabs  and  spaces\r\nend'


def window_starts(batch):
  """Where each row sits in STREAM, checking that it is an aligned window of it."""
  inputs, targets = batch['inputs'], batch['targets']
  starts = inputs[:, 0]
  np.testing.assert_array_equal(starts % SEQ_LEN, 0)
  np.testing.assert_array_equal(inputs, starts[:, None] + np.arange(SEQ_LEN))
  np.testing.assert_array_equal(targets, inputs + 1)
  return starts.tolist()


def corpus_digest(documents):
  return hashlib.sha256(json.dumps(documents).encode()).hexdigest()


# ----------------------------------------------------------------------------- corpus


def test_embedded_corpus_holds_pydoc_topics_and_stdlib_docstrings():
  from pydoc_data.topics import topics
  documents = data.embedded_corpus()
  names = [name for name, _ in documents]
  total_bytes = sum(len(text.encode('utf-8')) for _, text in documents)
  assert total_bytes > 1_500_000 and len(documents) > 400
  assert len(set(names)) == len(names)
  by_name = dict(documents)
  assert by_name['pydoc/assert'] == topics['assert']
  assert 'Assert statements are a convenient way' in by_name['pydoc/assert']
  assert sum(name.startswith('pydoc/') for name in names) == len(topics)
  import json as json_module
  assert by_name['stdlib/json/__init__.py'].startswith(json_module.__doc__.strip()[:60])
  skipped = ('test', 'tests', 'idlelib', 'site-packages')
  assert not any(part in skipped for name in names for part in name.split('/'))
  stdlib = [name for name in names if name.startswith('stdlib/')]
  assert stdlib == sorted(stdlib)


def test_embedded_corpus_is_the_same_in_a_fresh_process_with_another_hash_seed():
  code = ('import hashlib, json; from deepseek_jax.data import pipeline as data; '
          'print(hashlib.sha256(json.dumps(data.embedded_corpus()).encode()).hexdigest())')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONHASHSEED='12345', PYTHONPATH=root)
  out = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == corpus_digest(data.embedded_corpus())


def test_split_is_a_stable_crc32_threshold():
  documents = [(f'doc{i}', 'x') for i in range(4000)]
  train, heldout = data.split(documents, 0.05)
  threshold = 0.05 * 2**32
  assert {n for n, _ in heldout} == {n for n, _ in documents if zlib.crc32(n.encode()) < threshold}
  assert len(train) + len(heldout) == len(documents)
  assert not {n for n, _ in train} & {n for n, _ in heldout}
  assert 0.04 < len(heldout) / len(documents) < 0.06  # 4000 draws: 0.05 +- 3 sigma (0.0103)
  # Adding documents leaves every earlier document on its side.
  more_train, more_heldout = data.split(documents + [(f'new{i}', 'y') for i in range(500)], 0.05)
  assert [d for d in more_heldout if d[0].startswith('doc')] == heldout
  assert [d for d in more_train if d[0].startswith('doc')] == train


def test_split_of_the_embedded_corpus():
  documents = data.embedded_corpus()
  train, heldout = data.split(documents)
  assert (train, heldout) == data.split(list(documents))
  assert 0.02 < len(heldout) / len(documents) < 0.09
  heldout_bytes = sum(len(t.encode()) for _, t in heldout)
  assert 0.02 < heldout_bytes / sum(len(t.encode()) for _, t in documents) < 0.10


# ----------------------------------------------------------------------------- paths


def test_load_documents_from_a_file_a_directory_and_a_glob(tmp_path):
  (tmp_path / 'b.txt').write_text('bravo\n' * 3000)  # 18,000 chars: three chunks
  (tmp_path / 'a.txt').write_text('alpha\n')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'c.txt').write_text('charlie\n')
  (tmp_path / 'notes.md').write_text('not text\n')
  (tmp_path / 'empty.txt').write_text('')

  from_file = data.load_documents(str(tmp_path / 'b.txt'))
  assert [n for n, _ in from_file] == [f'{tmp_path / "b.txt"}#{k}' for k in range(3)]
  assert ''.join(t for _, t in from_file) == 'bravo\n' * 3000
  assert all(t.endswith('\n') for _, t in from_file)  # chunks end at line ends

  from_dir = data.load_documents(str(tmp_path))
  files = sorted({n.rsplit('#', 1)[0] for n, _ in from_dir})
  assert files == sorted(str(tmp_path / f) for f in ('a.txt', 'b.txt', 'sub/c.txt'))
  from_glob = data.load_documents(str(tmp_path / '*.txt'))
  assert [t for _, t in from_glob] == ['alpha\n'] + [t for _, t in from_file]
  assert data.load_documents('') == data.embedded_corpus()


@pytest.mark.parametrize('case', ['missing', 'no_match', 'empty_dir', 'empty_files'])
def test_bad_paths_fail_naming_the_path(tmp_path, case):
  path = {'missing': tmp_path / 'nowhere.txt', 'no_match': tmp_path / '*.nothing',
          'empty_dir': tmp_path, 'empty_files': tmp_path / '*.txt'}[case]
  if case == 'empty_files':
    (tmp_path / 'a.txt').write_text('')
    (tmp_path / 'b.txt').write_text('  \n')
  with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
    data.load_documents(str(path))


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_is_utf8():
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(UNICODE_TEXT)
  np.testing.assert_array_equal(ids, list(UNICODE_TEXT.encode('utf-8')))
  assert ids.dtype == np.int32 and tok.decode(ids) == UNICODE_TEXT
  assert tok.bytes_per_token.shape == (256,) and (tok.bytes_per_token == 1).all()


def test_bpe_round_trips_and_counts_utf8_bytes(tmp_path):
  from pydoc_data.topics import topics
  train_docs = [(name, topics[name]) for name in sorted(topics)[:12]]
  tok = tokenizer_lib.make_tokenizer(dict(tokenizer='bpe'), str(tmp_path), train_docs, 320)
  assert isinstance(tok, tokenizer_lib.BpeTokenizer) and tok.vocab_size == 320
  assert tok.bytes_per_token.shape == (320,) and tok.bytes_per_token.max() > 1
  for text in (UNICODE_TEXT, topics['while'], ''):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bytes_per_token[ids].sum() == len(text.encode('utf-8'))
  assert len(tok.encode(topics['while'])) < 0.7 * len(topics['while'].encode())
  # Saved in the workdir and reused without the training text; the same ids as the first.
  assert (tmp_path / 'tokenizer.json').exists()
  again = tokenizer_lib.make_tokenizer(dict(tokenizer='bpe'), str(tmp_path), [], 320)
  np.testing.assert_array_equal(again.encode(UNICODE_TEXT), tok.encode(UNICODE_TEXT))
  retrained = tokenizer_lib.BpeTokenizer.train([t for _, t in train_docs], 320)
  np.testing.assert_array_equal(retrained.encode(topics['while']), tok.encode(topics['while']))
  with pytest.raises(ValueError, match='model.vocab_size=300'):
    tokenizer_lib.make_tokenizer(dict(tokenizer='bpe'), str(tmp_path), [], 300)


def test_make_tokenizer_defaults_to_bytes_and_rejects_unknown_names():
  assert isinstance(tokenizer_lib.make_tokenizer(dict(), None, []), tokenizer_lib.ByteTokenizer)
  with pytest.raises(ValueError, match='data.tokenizer'):
    tokenizer_lib.make_tokenizer(dict(tokenizer='sentencepiece'), None, [])
  with pytest.raises(ValueError, match='model.vocab_size=128'):
    tokenizer_lib.make_tokenizer(dict(), None, [], 128)


def test_tokenize_split_and_prepare(tmp_path):
  documents = [('a', 'one'), ('b', 'two')]
  stream = data.tokenize_split(documents, tokenizer_lib.ByteTokenizer())
  assert stream.dtype == np.int32
  assert stream.tobytes() == np.frombuffer(b'one\n\ntwo\n\n', np.uint8).astype(np.int32).tobytes()
  (tmp_path / 'text.txt').write_text('line of text\n' * 8000)  # 104,000 chars: 13 chunks
  prepared = data.prepare(dict(path=str(tmp_path / 'text.txt'), heldout_fraction=0.3), None, 256)
  assert sum(prepared.num_documents) == 13 and min(prepared.num_documents) > 0
  total = len(prepared.train_tokens) + len(prepared.heldout_tokens)
  assert total == 104_000 + 13 * len(data.SEPARATOR)


# ----------------------------------------------------------------------------- windows


def test_eval_windows_tile_the_stream():
  batches = data.eval_batches(STREAM, SEQ_LEN, batch_size=4)
  assert len(batches) == NUM_WINDOWS // 4
  inputs = np.concatenate([b['inputs'] for b in batches]).reshape(-1)
  targets = np.concatenate([b['targets'] for b in batches]).reshape(-1)
  np.testing.assert_array_equal(inputs, STREAM[:NUM_WINDOWS * SEQ_LEN])
  np.testing.assert_array_equal(targets, STREAM[1:NUM_WINDOWS * SEQ_LEN + 1])
  assert batches[0]['inputs'].shape == (4, SEQ_LEN) and batches[0]['inputs'].dtype == np.int32
  assert len(data.eval_batches(STREAM, SEQ_LEN, 4, max_batches=5)) == 5
  halves = [data.eval_batches(STREAM, SEQ_LEN, 4, 5, p, 2) for p in range(2)]
  for whole, first, second in zip(data.eval_batches(STREAM, SEQ_LEN, 4, 5), *halves):
    stacked = np.concatenate([first['inputs'], second['inputs']])
    np.testing.assert_array_equal(whole['inputs'], stacked)


def test_training_epochs_are_permutations_of_all_windows():
  it = data.train_iterator(STREAM, SEQ_LEN, batch_size=4, seed=0)
  per_epoch = NUM_WINDOWS // 4
  epochs = [[s for _ in range(per_epoch) for s in window_starts(next(it))] for _ in range(2)]
  all_starts = list(range(0, NUM_WINDOWS * SEQ_LEN, SEQ_LEN))
  assert sorted(epochs[0]) == all_starts and sorted(epochs[1]) == all_starts
  assert epochs[0] != epochs[1] and epochs[0] != all_starts  # reshuffled, and shuffled at all


def take(it, n):
  return [window_starts(next(it)) for _ in range(n)]


def test_shuffle_follows_the_seed():
  same = take(data.train_iterator(STREAM, SEQ_LEN, 4, seed=7), 6)
  assert same == take(data.train_iterator(STREAM, SEQ_LEN, 4, seed=7), 6)
  assert same != take(data.train_iterator(STREAM, SEQ_LEN, 4, seed=8), 6)
  # grain reshuffles epoch e with seed + e; spread seeds so seed 8 is not seed 7's second epoch.
  assert data.shuffle_seed(8) - data.shuffle_seed(7) != 1


def test_resuming_from_a_saved_state_gives_the_same_batches():
  it = data.train_iterator(STREAM, SEQ_LEN, 4, seed=3)
  take(it, 40)  # past the first epoch (31 batches)
  saved = json.dumps(it.get_state())
  expected = take(it, 5)
  resumed = data.train_iterator(STREAM, SEQ_LEN, 4, seed=3)
  resumed.set_state(json.loads(saved))
  assert take(resumed, 5) == expected


def test_processes_split_every_global_batch_into_contiguous_row_blocks():
  whole = data.train_iterator(STREAM, SEQ_LEN, 8, seed=1)
  parts = [data.train_iterator(STREAM, SEQ_LEN, 8, seed=1, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(20):
    global_batch = next(whole)
    local = [next(part) for part in parts]
    assert local[0]['inputs'].shape == (4, SEQ_LEN)
    for key in ('inputs', 'targets'):
      np.testing.assert_array_equal(global_batch[key], np.concatenate([b[key] for b in local]))
    assert not set(window_starts(local[0])) & set(window_starts(local[1]))
  with pytest.raises(ValueError, match='train.batch_size=6'):
    data.train_iterator(STREAM, SEQ_LEN, 6, seed=1, process_index=0, process_count=4)


def test_too_short_a_stream_fails_with_its_length():
  with pytest.raises(ValueError, match='8 tokens'):
    data.train_iterator(STREAM[:8], SEQ_LEN, 4, seed=0)
  with pytest.raises(ValueError, match='held-out split has 40 tokens'):
    data.eval_batches(STREAM[:40], SEQ_LEN, 8)


def test_bits_per_byte():
  # A uniform guess over bytes costs exactly 8 bits per byte.
  assert data.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0, rel=1e-12)
  # Tokens of 4 bytes each, uniform over 65,536: 16 bits per token, 4 bits per byte.
  assert data.bits_per_byte(250 * math.log(65536), 1000) == pytest.approx(4.0, rel=1e-12)
  with pytest.raises(ValueError):
    data.bits_per_byte(1.0, 0)

"""`experiments.eval` on a Hugging Face directory, on one device and on a (1, 2, 4) mesh, against
the cross-entropy of the same windows computed in float64 numpy from the plain import's logits."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

from deepseek_jax.convert import hf as convert  # noqa: E402
from tests import processes as processes_lib  # noqa: E402
from tests.test_hf_parity import hf_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = ''.join(f'Line {i}: the quick brown fox jumps over {i % 7} lazy dogs.\n' for i in range(60))
T, B = 16, 8


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A tiny HF model with 256 tokens, so the byte tokenizer serves it (no tokenizer.json)."""
  directory = tmp_path_factory.mktemp('hf_eval')
  hf_model(seed=4, vocab_size=256).save_pretrained(directory)
  (directory / 'text.txt').write_text(TEXT)
  return directory


def reference(directory: pathlib.Path, batches: int, keep_fp8: bool = False) -> tuple[float, int]:
  """(mean nats per token, tokens) over the first `batches` x B windows of T + 1 bytes, from the
  logits of the one-device import (`keep_fp8`: its weights kept in E4M3)."""
  _, model = convert.load_pretrained(directory, keep_fp8=keep_fp8)
  data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
  ids = np.arange(batches * B)
  window = data[ids[:, None] * T + np.arange(T + 1)]
  logits = np.asarray(model(jnp.asarray(window[:, :-1])).logits, np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -np.take_along_axis(logp, window[:, 1:, None], -1).sum()
  return nats / window[:, 1:].size, window[:, 1:].size


def run_eval(*flags: str) -> dict:
  result = subprocess.run([sys.executable, '-m', 'experiments.eval', *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['1,1,1', '1,2,4'])
def test_eval_matches_float64_cross_entropy(saved, mesh):
  out = run_eval(f'--hf={saved}', f'--data.path={saved / "text.txt"}', f'--seq_len={T}',
                 f'--batch_size={B}', '--max_batches=2', f'--mesh={mesh}')
  want, tokens = reference(saved, 2)
  assert out['tokens'] == tokens
  assert abs(out['eval_loss'] - want) <= 1e-5 * want
  assert abs(out['eval_bpb'] - want / np.log(2)) <= 1e-5 * want  # one byte per token
  assert out['mesh'] == dict(zip(('data', 'expert', 'plane'), map(int, mesh.split(','))))
  assert out['tokens_per_s'] > 0


def test_eval_names_its_bad_input(saved, tmp_path):
  for flags, message in ((['--hf=' + str(tmp_path / 'nothing')], 'nothing'),
                         ([f'--hf={saved}', f'--workdir={saved}'], 'exactly one'),
                         ([f'--hf={saved}', '--mesh=1,2'], '--mesh=1,2')):
    result = subprocess.run([sys.executable, '-m', 'experiments.eval', *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_evaluate_like_one(saved):
  """2 processes x 4 CPU devices on the (1, 2, 4) mesh: each reads its blocks and its rows; the
  loss is the float64 reference's, printed once."""
  import os  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  outputs = processes_lib.run_entry_point('experiments.eval', [
      f'--hf={saved}', f'--data.path={saved / "text.txt"}', f'--seq_len={T}',
      f'--batch_size={B}', '--max_batches=2', '--mesh=1,2,4'], env)
  # only process 0 prints its JSON (gloo prints its own connection lines)
  assert not [line for line in outputs[1][0].splitlines() if line.startswith('{')]
  out = json.loads(outputs[0][0].strip().splitlines()[-1])
  want, tokens = reference(saved, 2)
  assert out['tokens'] == tokens
  assert abs(out['eval_loss'] - want) <= 1e-5 * want

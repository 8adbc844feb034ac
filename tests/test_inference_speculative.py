"""Speculative decoding with the MTP drafter, and generation from saved models: on a checkpoint
trained here (BPE tokenizer in the workdir, as the tiny config), greedy speculative output equals
greedy plain output token for token, and the restored model reproduces the training loop's own
greedy sample; on a random model whose drafts are mostly rejected (so the cache is rolled back
often) the outputs are equal too, in both cache modes; the command prints the promised JSON;
a Hugging Face directory decodes to the tokens transformers' model would choose."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax.inference import decode, load, sampling, speculative
from deepseek_jax.train import loop
from deepseek_jax.data.tokenizer import BpeTokenizer
from experiments.configs import tiny
from tests.tiny import full_logits, random_model, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=384, hidden_size=48, num_layers=2, num_heads=2, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=16, kv_lora_rank=12,
             intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
             num_experts_per_tok=2, n_group=4, topk_group=2, mtp_depth=1)
TRAIN = dict(steps=30, batch_size=8, seq_len=32, warmup_steps=2, learning_rate=1e-2, log_every=10,
             eval_every=1000, checkpoint_every=1000, eval_batches=1, sample_prompt='The ',
             sample_tokens=24)
PROMPTS = ['The ', 'Return the value of', 'x']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with a 30-step checkpoint of a very small model and its BPE tokenizer."""
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny.get_config()
  config.model.update(MODEL)
  config.train.update(TRAIN)
  config.data.tokenizer = 'bpe'
  config.mesh.data = 1  # one device, as the sample is compared with a one-device decoder
  loop.train(config, workdir)
  return workdir


@pytest.mark.slow
def test_restored_checkpoint_reproduces_the_training_sample(trained):
  loaded = load.load(trained)
  assert loaded.source == str(trained / 'checkpoints' / '30')
  assert isinstance(loaded.tokenizer, BpeTokenizer) and loaded.cfg.vocab_size == 384
  # report.sample decoded greedily by recomputing the whole window each token, from the
  # in-memory final state; the cached decoder reads the checkpoint back.
  ids = loaded.tokenizer.encode(TRAIN['sample_prompt'])
  result = decode.generate(loaded.model, [ids], TRAIN['sample_tokens'])
  assert loaded.tokenizer.decode(result.tokens[0]) == (trained / 'sample.txt').read_text()


@pytest.mark.slow
def test_unreadable_checkpoint_names_the_path(trained, tmp_path):
  shutil.copytree(trained / 'checkpoints', tmp_path / 'checkpoints')
  state = tmp_path / 'checkpoints' / '30' / 'state'
  for data in state.rglob('*'):
    if data.is_file() and data.parent.name == 'd':  # the array data, not the metadata
      data.write_bytes(b'')
  with pytest.raises(ValueError, match=rf'checkpoint {tmp_path}/checkpoints/30 cannot be '
                                       'restored'):
    load.load(tmp_path)


@pytest.mark.slow
def test_greedy_speculative_equals_greedy_on_trained_checkpoint(trained):
  loaded = load.load(trained)
  prompts = [loaded.tokenizer.encode(text) for text in PROMPTS]
  assert len({len(p) for p in prompts}) == 3  # unequal lengths
  plain = decode.generate(loaded.model, prompts, 40)
  spec = speculative.generate(loaded.model, prompts, 40)
  print(f'acceptance {spec.acceptance_rate:.3f}, plain {plain.tokens_per_s:.0f} tok/s, '
        f'speculative {spec.tokens_per_s:.0f} tok/s')
  assert np.array_equal(spec.tokens, plain.tokens)
  assert plain.acceptance_rate is None and 0.0 <= spec.acceptance_rate <= 1.0
  cfg = loaded.cfg
  assert spec.cache_bytes_per_token == plain.cache_bytes_per_token
  assert spec.draft_cache_bytes_per_token * cfg.num_layers == spec.cache_bytes_per_token


def rejecting_model():
  """An untrained model: its MTP module's drafts are mostly wrong."""
  cfg = tiny_config(num_layers=2)
  rng = np.random.default_rng(0)
  return random_model(cfg, seed=3), [rng.integers(0, cfg.vocab_size, n) for n in (7, 2, 12, 4)]


@pytest.mark.parametrize('mode', ['absorbed', 'naive'])
def test_speculative_with_rejected_drafts_equals_greedy(mode):
  model, prompts = rejecting_model()
  plain = decode.generate(model, prompts, 48, mode=mode)
  spec = speculative.generate(model, prompts, 48, mode=mode)
  print(f'{mode}: acceptance {spec.acceptance_rate:.3f}')
  assert 0.0 < spec.acceptance_rate < 0.8  # rejections (rollbacks) and acceptances both happen
  assert np.array_equal(spec.tokens, plain.tokens)


def test_speculative_sampling_path():
  model, prompts = rejecting_model()
  greedy = decode.generate(model, prompts, 48)
  # Accept with min(1, p/q), else resample from max(0, p - q): with top_k=1 both p and q are
  # one-hot, so the rule must reproduce greedy decoding exactly.
  one_hot = speculative.generate(model, prompts, 48, sampling=sampling.Sampling(1.0, top_k=1),
                                 seed=5)
  assert np.array_equal(one_hot.tokens, greedy.tokens)
  config = sampling.Sampling(1.0)
  first = speculative.generate(model, prompts, 48, sampling=config, seed=7)
  again = speculative.generate(model, prompts, 48, sampling=config, seed=7)
  assert np.array_equal(first.tokens, again.tokens)
  assert not np.array_equal(first.tokens, greedy.tokens)
  assert again.compile_s < 0.5 * first.compile_s  # the second call reuses the executables


def test_speculative_needs_an_mtp_module():
  model = random_model(tiny_config(mtp_depth=0))
  with pytest.raises(ValueError, match='mtp_depth=0'):
    speculative.generate(model, [[1, 2]], 4)


def run_command(*flags: str) -> tuple[str, dict]:
  done = subprocess.run([sys.executable, '-m', 'experiments.generate', *flags], cwd=ROOT,
                        capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT)))
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.strip().splitlines()
  return '\n'.join(lines[:-1]), json.loads(lines[-1])


@pytest.mark.slow
def test_generate_command(trained):
  text, row = run_command(f'--workdir={trained}', '--prompt=The ', '--max_new_tokens=16',
                          '--speculative', '--temperature=0')
  assert text.startswith('The ')
  assert row['new_tokens'] == 16 and row['tokens_per_s'] > 0
  assert 0.0 <= row['acceptance_rate'] <= 1.0
  C, R, L = MODEL['kv_lora_rank'], MODEL['qk_rope_head_dim'], MODEL['num_layers']
  assert row['cache_bytes_per_token'] == (C + R) * L * 4  # float32 activations
  loaded = load.load(trained)
  plain = decode.generate(loaded.model, [loaded.tokenizer.encode('The ')], 16)
  assert text.rstrip('\n') == ('The ' + loaded.tokenizer.decode(plain.tokens[0])).rstrip('\n')


@pytest.mark.slow
def test_hugging_face_directory(tmp_path):
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  # pylint: disable-next=import-outside-toplevel
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
  torch.manual_seed(0)
  config = DeepseekV3Config(
      vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=8,
      qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=16, kv_lora_rank=12, n_shared_experts=1,
      n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
      first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.2,
      rope_parameters={'rope_type': 'default', 'rope_theta': 10_000.0},
      num_nextn_predict_layers=0)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  hf = DeepseekV3ForCausalLM(config).float().eval()
  hf.save_pretrained(tmp_path)
  loaded = load.load(tmp_path)
  assert loaded.tokenizer.vocab_size == 256  # no tokenizer.json: bytes
  prompts = [loaded.tokenizer.encode(text) for text in ('The ', 'abc def')]
  result = decode.generate(loaded.model, prompts, 12)
  for prompt, new in zip(prompts, result.tokens):
    sequence = np.concatenate([prompt, new])[None]
    with torch.no_grad():
      logits = hf(torch.as_tensor(sequence, dtype=torch.long)).logits.numpy()[0]
    # transformers' greedy choice at every generated position
    assert np.array_equal(logits[len(prompt) - 1:-1].argmax(-1), new)
    ours = full_logits(loaded.model, sequence)[0]
    assert np.abs(ours - logits).max() < 1e-4
  with pytest.raises(ValueError, match='mtp_depth=0'):
    speculative.generate(loaded.model, prompts, 4)

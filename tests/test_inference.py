"""Cached decoding: the absorbed latent cache, the naive materialized cache and a full recompute
without any cache give the same logits for 64 generated steps of a batch of unequal prompts; the
cache holds exactly (C + R) x L x itemsize bytes per token (70,272 for DeepSeek-V3 in BF16);
impossible requests fail with messages that name the value or the path."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.analysis import kv_cache
from deepseek_jax.config import ModelConfig
from deepseek_jax.inference import cache as cache_lib
from deepseek_jax.inference import decode, load
from experiments.configs import deepseek_v3
from tests.tiny import full_logits, random_model, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
STEPS = 64
PROMPT_LENGTHS = (5, 11, 1)
CASES = {
    # Q-LoRA query and YaRN past the original context (positions reach 74 > 16): mscale^2 scale.
    'qlora_yarn': dict(q_lora_rank=16, rope_factor=4.0, rope_original_max_position=16,
                       rope_theta=10.0),
    # DeepSeek-V2-Lite's single query projection, plain RoPE.
    'plain_query': dict(q_lora_rank=None, rope_factor=1.0),
}


def prompts_for(cfg: ModelConfig, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in PROMPT_LENGTHS]


def stepwise(model, prompts, mode: str, forced: np.ndarray | None = None):
  """Greedy decoding one jitted step at a time: (tokens [B, STEPS], logits [B, STEPS, V]).
  With `forced`, feeds those tokens instead of its own (teacher forcing)."""
  tokens, lengths, max_len = decode.pad_prompts(prompts, STEPS, None, model.cfg)
  decoder = decode.Decoder(model, mode=mode)
  cache = decoder.init_cache(len(prompts), max_len)
  key = jax.random.key(0)
  token, logits, cache = decoder.prefill(jnp.asarray(tokens), jnp.asarray(lengths), cache, key)
  out, all_logits = [token], [logits]
  for i in range(1, STEPS):
    feed = token if forced is None else jnp.asarray(forced[:, i - 1])
    token, logits, cache = decoder.step(feed, cache, key, i)
    out.append(token)
    all_logits.append(logits)
  assert np.array_equal(np.asarray(cache.lengths), lengths + STEPS - 1)
  return np.stack(out, 1), np.stack(all_logits, 1)


def recompute(model, prompts, generated: np.ndarray) -> np.ndarray:
  """Logits of the full model, no cache, over prompt + generated tokens (right-padded; causal,
  so position i's logits are what recomputing the whole prefix at that step would give)."""
  full = np.zeros((len(prompts), max(map(len, prompts)) + STEPS), np.int32)
  for b, p in enumerate(prompts):
    full[b, :len(p)] = p
    full[b, len(p):len(p) + STEPS] = generated[b]
  logits = full_logits(model, full)
  return np.stack([logits[b, len(p) - 1:len(p) - 1 + STEPS] for b, p in enumerate(prompts)])


@pytest.mark.parametrize('case', sorted(CASES))
def test_absorbed_naive_and_recompute_give_the_same_logits(case):
  cfg = tiny_config(**CASES[case])
  model = random_model(cfg, seed=1)
  prompts = prompts_for(cfg)
  absorbed_tokens, absorbed_logits = stepwise(model, prompts, 'absorbed')
  naive_tokens, naive_logits = stepwise(model, prompts, 'naive', forced=absorbed_tokens)
  reference = recompute(model, prompts, absorbed_tokens)
  assert np.abs(reference).max() > 1.0  # the comparison is not between near-zero logits
  diffs = {'absorbed-recompute': np.abs(absorbed_logits - reference).max(),
           'naive-recompute': np.abs(naive_logits - reference).max(),
           'absorbed-naive': np.abs(absorbed_logits - naive_logits).max()}
  print(case, {k: f'{v:.2e}' for k, v in diffs.items()})
  assert max(diffs.values()) <= TOL, diffs
  # Greedy in the naive cache would have chosen the same tokens.
  assert np.array_equal(naive_tokens, absorbed_tokens)
  # The scan-looped generate() reproduces the step-by-step greedy tokens.
  assert np.array_equal(decode.generate(model, prompts, STEPS).tokens, absorbed_tokens)


@pytest.mark.parametrize('fp8_weights', [False, True])
def test_fp8_model_decodes_with_its_uncached_logits(fp8_weights):
  """Every projection in FP8 (V3 §3.3). The absorbed path multiplies the FP8-rounded W_UK, W_UV
  and c_KV that the uncached path's GEMMs multiply, so it gives the uncached logits up to
  accumulation order: measured 1.2e-6 at the median step. FP8 rounding is a step function,
  though: where a value sits on a rounding boundary, an accumulation-order difference of 1e-7
  moves it one E4M3 step (~6%), and once that happens in a cached entry every later step of that
  sequence differs (here one sequence from step 5 on, by at most 3.8% of the logit scale).
  Without the FP8 rounding in the absorbed path the median step is off by 0.50 (10%).
  `fp8_weights`: the same with every such weight kept in E4M3 (`load.quantize_weights`), whose
  absorbed path multiplies the kept W_UK, W_UV times their scales."""
  cfg = tiny_config(precision='fp8')
  model = random_model(cfg, seed=1)
  if fp8_weights:
    model = load.quantize_weights(model)
    assert model.cfg.fp8_weights
    assert model.moe_layers.ffn.w_up.get_value().dtype == jnp.float8_e4m3fn
  prompts = prompts_for(cfg)
  absorbed_tokens, absorbed_logits = stepwise(model, prompts, 'absorbed')
  _, naive_logits = stepwise(model, prompts, 'naive', forced=absorbed_tokens)
  reference = recompute(model, prompts, absorbed_tokens)
  scale = np.abs(reference).max()
  for name, logits in (('absorbed', absorbed_logits), ('naive', naive_logits)):
    per_step = np.abs(logits - reference).max(-1)  # [B, STEPS]
    print(name, np.quantile(per_step, [0.5, 0.9, 1.0]))
    assert np.median(per_step) <= TOL, (name, np.median(per_step))
    assert per_step.max() <= 0.1 * scale, (name, per_step.max(), scale)
  assert np.median(np.abs(absorbed_logits - naive_logits).max(-1)) <= TOL


def test_cache_bytes_per_token_deepseek_v3_bf16():
  cfg = ModelConfig.from_dict(deepseek_v3.get_config().model.to_dict())
  assert cfg.dtype == 'bfloat16'
  latent = cache_lib.abstract_bytes_per_token(cfg, 'absorbed')
  assert latent == 70_272 == (512 + 64) * 61 * 2 == kv_cache.mla_bytes(cfg)
  naive = cache_lib.abstract_bytes_per_token(cfg, 'naive')
  assert naive == 128 * (128 + 64 + 128) * 61 * 2 == kv_cache.mla_as_kv_heads_bytes(cfg)
  assert naive / latent >= 10  # 71.1x


def test_cache_layout_and_bytes_of_a_real_cache():
  cfg = tiny_config(q_lora_rank=16)
  latent = cache_lib.init(cfg, batch=3, max_len=40)
  assert [a.shape for a in latent.c_kv] == [(3, 40, 12)] * 3
  assert [a.shape for a in latent.k_rope] == [(3, 40, 4)] * 3
  assert cache_lib.bytes_per_token(latent) == (12 + 4) * 3 * 4  # float32 activations
  assert cache_lib.nbytes(latent) == 3 * 40 * (12 + 4) * 3 * 4
  naive = cache_lib.init(cfg, 3, 40, 'naive')
  assert [a.shape for a in naive.k] == [(3, 4, 40, 12)] * 3
  assert cache_lib.bytes_per_token(naive) == 4 * (8 + 4 + 6) * 3 * 4
  mtp = cache_lib.init(cfg, 3, 40, num_layers=1, dtype='bfloat16')
  assert len(mtp.c_kv) == 1 and mtp.c_kv[0].dtype == jnp.bfloat16
  assert cache_lib.bytes_per_token(mtp) == (12 + 4) * 2


def test_prompt_errors_name_the_value():
  cfg = tiny_config(q_lora_rank=16)
  with pytest.raises(ValueError, match=r'prompt 1 has 30 tokens, longer than the cache '
                                       r'\(max_len=20\)'):
    decode.pad_prompts([[1, 2], list(range(30))], 4, 20, cfg)
  with pytest.raises(ValueError, match=r'prompt 1 is empty \(0 tokens\)'):
    decode.pad_prompts([[1, 2], []], 4, None, cfg)
  with pytest.raises(ValueError, match=r'\(10 tokens\) \+ max_new_tokens=20 = 30 exceeds the '
                                       r'cache \(max_len=16\)'):
    decode.pad_prompts([list(range(10))], 20, 16, cfg)
  with pytest.raises(ValueError, match=r'token ids 0\.\.97 outside the vocabulary \[0, 97\)'):
    decode.pad_prompts([[0, 97]], 4, None, cfg)
  with pytest.raises(ValueError, match=r'max_len=300 exceeds .* max_position_embeddings=256'):
    decode.pad_prompts([[1]], 4, 300, cfg)
  with pytest.raises(ValueError, match=r"mode='paged'"):
    decode.Decoder(random_model(cfg), mode='paged')


def test_workdir_errors_name_the_path(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(FileNotFoundError, match=f'{missing} does not exist'):
    load.load(missing)
  with pytest.raises(FileNotFoundError, match=rf'no checkpoint in {tmp_path}/checkpoints'):
    load.load(tmp_path)
  (tmp_path / 'checkpoints').mkdir()  # an empty checkpoints directory is still no checkpoint
  with pytest.raises(FileNotFoundError, match=rf'no checkpoint in {tmp_path}/checkpoints'):
    load.load(tmp_path)
  assert list((tmp_path / 'checkpoints').iterdir()) == []  # nothing was written there


def test_generate_command_reports_a_missing_checkpoint(tmp_path):
  done = subprocess.run([sys.executable, '-m', 'experiments.generate', f'--workdir={tmp_path}',
                         '--prompt=The '], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT)))
  assert done.returncode != 0
  assert f'error: no checkpoint in {tmp_path}/checkpoints' in done.stderr

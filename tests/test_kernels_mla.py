"""The latent-attention decode kernel (`kernels/mla_decode.py`, Pallas interpret mode on CPU)
against `kernels/reference.py` and a float64 numpy computation of the same attention: lengths 0,
1 and not multiples of the block, Tq = 2 causal under FlashMLA's length convention, caches that
are not a multiple of the block, several splits of the cache, a paged cache; and decoding with the
kernel gives the same greedy tokens as the XLA path, and the same logits for a prefill and a
Tq = 2 step."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from flax import nnx

from deepseek_jax.inference import cache as cache_lib
from deepseek_jax.inference import decode
from experiments.configs import tiny
from kernels import mla_decode as kernel
from kernels import reference
from tests.kernel_util import SCALE, numpy_mla, rel_err
from tests.kernel_util import mla_inputs as inputs
from tests.tiny import random_model

# (B, Tq, N, C, R, S, lengths, num_splits): block_s is 64 below.
CASES = [
    pytest.param(4, 1, 4, 32, 16, 200, [0, 1, 63, 200], 3, id='Tq1-len0-1-63-full-3splits'),
    pytest.param(4, 2, 4, 32, 16, 130, [1, 2, 65, 130], 1, id='Tq2-len1-2-65-full-1split'),
    pytest.param(2, 2, 16, 64, 16, 256, [129, 256], 8, id='Tq2-N16-splits-beyond-length'),
    pytest.param(1, 1, 20, 32, 32, 70, [70], None, id='rows-not-power-of-two-default-splits'),
]


@pytest.mark.parametrize('B,T,N,C,R,S,lengths,splits', CASES)
def test_float32_matches_the_reference_and_float64(B, T, N, C, R, S, lengths, splits):
  args = inputs(B, T, N, C, R, S, jnp.float32)
  lengths = jnp.asarray(lengths, jnp.int32)
  o, lse = kernel.mla_decode(*args, lengths, SCALE, block_s=64, num_splits=splits)
  ref_o, ref_lse = reference.mla_decode(*args, lengths, SCALE)
  np_o, np_lse = numpy_mla(*args, lengths)
  assert o.shape == (B, T, N, C) and o.dtype == jnp.float32 and lse.shape == (B, T, N)
  assert rel_err(ref_o, np_o) <= 1e-5  # the reference itself
  assert rel_err(o, ref_o) <= 1e-5
  # queries that see nothing: o = 0 and lse = -inf in all three
  empty = ~np.isfinite(np_lse)
  np.testing.assert_array_equal(~np.isfinite(np.asarray(lse)), empty)
  np.testing.assert_array_equal(~np.isfinite(np.asarray(ref_lse)), empty)
  assert np.all(np.asarray(o)[empty] == 0)
  np.testing.assert_allclose(np.asarray(lse)[~empty], np_lse[~empty], rtol=1e-5, atol=1e-5)


def test_bfloat16_within_2e_2_of_the_reference():
  args = inputs(3, 2, 8, 64, 16, 300, jnp.bfloat16, seed=1)
  lengths = jnp.asarray([1, 150, 300], jnp.int32)
  o, lse = kernel.mla_decode(*args, lengths, SCALE, num_splits=2)
  ref_o, ref_lse = reference.mla_decode(*args, lengths, SCALE)
  assert o.dtype == jnp.bfloat16
  assert rel_err(o, ref_o) <= 2e-2
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))  # lengths 1 with Tq 2
  assert rel_err(lse[np.isfinite(lse)], ref_lse[np.isfinite(lse)]) <= 2e-2


@pytest.mark.parametrize('T,splits', [(1, 1), (2, 3)])
def test_paged_cache_equals_the_contiguous_reference(T, splits):
  """Pages of 64 slots scattered over a pool in random order, read through the block table."""
  rng = np.random.default_rng(4)
  B, N, C, R, page, pages, pool = 3, 4, 32, 16, 64, 4, 16
  ql, qr, _, _ = inputs(B, T, N, C, R, 1, jnp.float32, seed=5)
  c_pool = jnp.asarray(rng.standard_normal((pool, page, C)), jnp.float32)
  k_pool = jnp.asarray(rng.standard_normal((pool, page, R)), jnp.float32)
  table = jnp.asarray(rng.permutation(pool)[:B * pages].reshape(B, pages), jnp.int32)
  lengths = jnp.asarray([0, 65, 250], jnp.int32)
  o, lse = kernel.mla_decode(ql, qr, c_pool, k_pool, lengths, SCALE, block_table=table,
                             num_splits=splits)
  c_kv, k_rope = reference.gather_pages(c_pool, table), reference.gather_pages(k_pool, table)
  np_o, np_lse = numpy_mla(ql, qr, c_kv, k_rope, lengths)
  assert rel_err(o, np_o) <= 1e-5
  finite = np.isfinite(np_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np_lse[finite], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'block_table \(2, 4\) must be \[B, pages\] with B = 3'):
    kernel.mla_decode(ql, qr, c_pool, k_pool, lengths, SCALE, block_table=table[:2])


def test_tq2_is_causal_inside_the_new_tokens():
  """Query 0 of a Tq = 2 call equals a Tq = 1 call with one slot fewer; query 1 a Tq = 1 call."""
  ql, qr, c, kr = inputs(2, 2, 4, 32, 16, 96, jnp.float32, seed=2)
  lengths = jnp.asarray([2, 77], jnp.int32)
  o, _ = kernel.mla_decode(ql, qr, c, kr, lengths, SCALE)
  first, _ = kernel.mla_decode(ql[:, :1], qr[:, :1], c, kr, lengths - 1, SCALE)
  second, _ = kernel.mla_decode(ql[:, 1:], qr[:, 1:], c, kr, lengths, SCALE)
  np.testing.assert_allclose(o[:, 0], first[:, 0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(o[:, 1], second[:, 0], rtol=1e-6, atol=1e-6)


def test_shape_errors_name_the_constraint():
  ql, qr, c, kr = inputs(1, 1, 4, 48, 16, 64, jnp.float32)
  with pytest.raises(ValueError, match=r'kv_lora_rank C=48 must be a power of two >= 16'):
    kernel.mla_decode(ql, qr, c, kr, jnp.ones((1,), jnp.int32), SCALE)
  with pytest.raises(ValueError, match=r'qk_rope_head_dim R=8'):
    kernel.use_kernel('pallas', 1, 32, 8)
  assert not kernel.use_kernel('auto', 1, 32, 8)  # 'auto' falls back instead
  assert not kernel.use_kernel('xla', 1, 32, 16)
  assert kernel.use_kernel('auto', 1, 32, 16) == (jax.default_backend() in ('gpu', 'tpu'))
  with pytest.raises(ValueError, match=r'lengths \(2,\) must be \[B\]'):
    kernel.mla_decode(ql[..., :32], qr, c[:, :, :32], kr, jnp.ones((2,), jnp.int32), SCALE)
  with pytest.raises(ValueError, match=r'shapes do not agree: q_latent \(1, 1, 4, 48\)'):
    kernel.mla_decode(ql, qr, c[:, :, :32], kr, jnp.ones((1,), jnp.int32), SCALE)
  with pytest.raises(ValueError, match="mla_decode_kernel='triton'"):
    ModelConfig(mla_decode_kernel='triton')


@pytest.fixture(scope='module')
def tiny_models():
  """The tiny config's model (C = 32, R = 16: shapes the kernel takes) with two of its four
  layers (interpret mode compiles slowly), random weights, once with each decode switch."""
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict()).replace(num_layers=2)
  xla = random_model(cfg.replace(mla_decode_kernel='xla', init_std=0.05), seed=3)
  pallas = random_model(cfg.replace(mla_decode_kernel='pallas', init_std=0.05), seed=3)
  return xla, pallas


PROMPTS = [[5, 17, 300, 42], [7], [1000, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.mark.slow
def test_greedy_decoding_with_the_kernel_gives_the_xla_tokens(tiny_models):
  xla, pallas = tiny_models
  want = decode.generate(xla, PROMPTS, 12)
  got = decode.generate(pallas, PROMPTS, 12)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert len(set(want.tokens.reshape(-1).tolist())) > 3  # not a degenerate model
  # the kernel's caches are allocated at a multiple of its 64-slot step, so it never pads them
  assert cache_lib.init(pallas.cfg, 3, 100).c_kv[0].shape == (3, 128, 32)
  assert cache_lib.init(xla.cfg, 3, 100).c_kv[0].shape == (3, 100, 32)


def cached_logits(model, prompts, new_tokens):
  """Logits of a T = 2 step after right-padded prompts were prefilled (T = 9) into a latent cache:
  the MTP verify step's shape, for the main model."""
  graphdef, state = nnx.split(model)
  tokens, lengths, max_len = decode.pad_prompts(prompts, 2, None, model.cfg)

  @jax.jit
  def run(state, tokens, lengths, new_tokens):
    m = nnx.merge(graphdef, state)
    cache = cache_lib.init(m.cfg, len(prompts), max_len)
    prefill = m(tokens, cache=cache)
    step = m(new_tokens, cache=prefill.cache.replace(lengths=lengths))
    return decode.at_lengths(prefill.logits, lengths), step.logits

  return run(state, tokens, lengths, jnp.asarray(new_tokens, jnp.int32))


def test_prefill_and_two_token_step_logits_with_the_kernel_equal_xla(tiny_models):
  xla, pallas = tiny_models
  new_tokens = [[3, 4], [500, 6], [7, 2047]]
  want = cached_logits(xla, PROMPTS, new_tokens)
  got = cached_logits(pallas, PROMPTS, new_tokens)
  for g, w in zip(got, want):
    assert rel_err(g, w) <= 1e-5

"""The Mosaic (TPU) kernels in Pallas' TPU interpret mode on CPU, against float64 numpy.

TPU interpret mode runs the kernel with TPU semantics: scalar prefetch in SMEM, VMEM scratch,
uninitialized memory filled with NaN, out-of-bounds reads raised. Shapes are small (the V3-shape
checks are compile-only, tests/test_kernels_lowering.py). Tolerances: decode 1e-5 relative (FP32,
the same sums in another order), 2e-2 for BF16; the FP8 GEMM 1e-6 relative to the largest output
(E4M3 x E4M3 products are exact in BF16 -> FP32; only FP32 summation order differs).
Also: the backend switch and the model's 'auto' switches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.fp8 import matmul as fp8_matmul_lib
from deepseek_jax.fp8 import quant
from kernels import fp8_matmul, fp8_matmul_tpu, mla_decode, reference
from tests.kernel_util import SCALE, blockwise_np, numpy_mla, rel_err
from tests.kernel_util import mla_inputs as inputs

max_error = rel_err


def tpu_decode(*args, **options):
  return jax.jit(lambda *a: mla_decode.mla_decode(*a, SCALE, backend='mosaic_tpu',
                                                  interpret=True, **options))(*args)


def assert_decode_matches(o, lse, np_o, np_lse, tolerance):
  assert rel_err(o, np_o) <= tolerance
  finite = np.isfinite(np_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)  # -inf where nothing seen
  assert np.all(np.asarray(o, np.float32)[~finite] == 0)
  np.testing.assert_allclose(np.asarray(lse)[finite], np_lse[finite], rtol=tolerance,
                             atol=tolerance)


# (B, Tq, N, C, R, S, lengths, block_s, num_splits)
DECODE_CASES = [
    pytest.param(4, 1, 4, 32, 16, 256, [0, 1, 63, 65], 64, 2, id='Tq1-len0-1-63-65-2splits'),
    pytest.param(3, 2, 8, 128, 64, 200, [1, 130, 200], None, None, id='Tq2-ragged-S-not-64x'),
]


@pytest.mark.parametrize('B,T,N,C,R,S,lengths,block_s,splits', DECODE_CASES)
def test_tpu_decode_matches_float64(B, T, N, C, R, S, lengths, block_s, splits):
  args = inputs(B, T, N, C, R, S, jnp.float32)
  lengths = jnp.asarray(lengths, jnp.int32)
  o, lse = tpu_decode(*args, lengths, block_s=block_s, num_splits=splits)
  assert o.shape == (B, T, N, C) and lse.shape == (B, T, N)
  assert_decode_matches(o, lse, *numpy_mla(*args, lengths), 1e-5)


def test_tpu_decode_bfloat16():
  args = inputs(2, 2, 16, 64, 16, 192, jnp.bfloat16, seed=1)
  lengths = jnp.asarray([1, 150], jnp.int32)
  o, lse = tpu_decode(*args, lengths)
  assert o.dtype == jnp.bfloat16
  assert_decode_matches(o, lse, *numpy_mla(*args, lengths), 2e-2)


def test_tpu_decode_paged_cache_pages_in_random_order():
  rng = np.random.default_rng(4)
  B, T, N, C, R, page, pages, pool = 3, 2, 4, 32, 16, 64, 4, 16
  ql, qr, _, _ = inputs(B, T, N, C, R, 1, jnp.float32, seed=5)
  c_pool = jnp.asarray(rng.standard_normal((pool, page, C)), jnp.float32)
  k_pool = jnp.asarray(rng.standard_normal((pool, page, R)), jnp.float32)
  table = jnp.asarray(rng.permutation(pool)[:B * pages].reshape(B, pages), jnp.int32)
  lengths = jnp.asarray([0, 65, 250], jnp.int32)
  o, lse = tpu_decode(ql, qr, c_pool, k_pool, lengths, block_table=table, num_splits=2)
  c_kv, k_rope = reference.gather_pages(c_pool, table), reference.gather_pages(k_pool, table)
  assert_decode_matches(o, lse, *numpy_mla(ql, qr, c_kv, k_rope, lengths), 1e-5)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def outlier_operands(M, K, N):
  """Quantized a (1x128 tiles) with every 7th row 1000x larger, b (128x128 blocks)."""
  keys = jax.random.split(jax.random.key(7), 3)
  a = jax.random.normal(keys[0], (M, K)) * jnp.where(jnp.arange(M)[:, None] % 7 == 3, 1e3, 1.0)
  b = jax.random.normal(keys[1], (K, N)) * jnp.exp(2 * jax.random.normal(keys[2], (K, 1)))
  return (*quant.quantize(a, quant.ACT_BLOCK), *quant.quantize(b, quant.WEIGHT_BLOCK))


@pytest.mark.parametrize('native_fp8', [False, True], ids=['widened', 'native'])
def test_tpu_fp8_gemm_ragged_shapes_and_outlier_rows(native_fp8):
  """M, N, K multiples of nothing (2 x 2 tiles, 2 K steps of 2 blocks, all padded)."""
  operands = outlier_operands(70, 500, 300)
  y = jax.jit(lambda *a: fp8_matmul.fp8_matmul(
      *a, backend='mosaic_tpu', interpret=True, block_m=64, block_n=256, block_k=256,
      native_fp8=native_fp8))(*operands)
  want = blockwise_np(*operands)
  assert y.shape == (70, 300) and y.dtype == jnp.float32
  assert max_error(y, want) <= 1e-6
  ordinary = np.arange(70) % 7 != 3  # the ordinary rows, measured against their own scale
  assert max_error(np.asarray(y)[ordinary], want[ordinary]) <= 1e-6


def test_tpu_fp8_gemm_bfloat16_out_and_per_column_b_scales():
  a_values, a_scales, _, _ = outlier_operands(40, 200, 136)
  b = jax.random.normal(jax.random.key(8), (200, 136))
  b_values, b_scales = quant.quantize(b, quant.TOKEN_BLOCK)  # 128x1 tiles: [Kb, N]
  y = jax.jit(lambda *a: fp8_matmul.fp8_matmul(*a, jnp.bfloat16, backend='mosaic_tpu',
                                               interpret=True))(a_values, a_scales, b_values,
                                                                b_scales)
  assert y.dtype == jnp.bfloat16
  assert max_error(y, blockwise_np(a_values, a_scales, b_values, b_scales)) <= 2e-2 / 5


def test_backend_switch_and_its_errors():
  ql, qr, c, kr = inputs(1, 1, 4, 32, 16, 64, jnp.float32)
  lengths = jnp.asarray([40], jnp.int32)
  with pytest.raises(ValueError, match=r"backend='cuda', expected one of \(None, 'triton', "
                     r"'mosaic_tpu'\)"):
    mla_decode.mla_decode(ql, qr, c, kr, lengths, SCALE, backend='cuda')
  with pytest.raises(ValueError, match=r'block_m=48 must be a multiple of 32'):
    fp8_matmul_tpu.block_sizes(64, 128, 128, 48, None, None)
  # None on CPU: the Triton kernel, interpreted; the Mosaic kernel's CPU branch: the generic
  # interpreter. All agree with the reference.
  want, _ = reference.mla_decode(ql, qr, c, kr, lengths, SCALE)
  for backend in (None, 'triton', 'mosaic_tpu'):
    o, _ = jax.jit(lambda *a, backend=backend: mla_decode.mla_decode(
        *a, SCALE, backend=backend))(ql, qr, c, kr, lengths)
    assert rel_err(o, want) <= 1e-5, backend
  assert mla_decode.supported(2, 512, 64, 'triton') and mla_decode.supported(1, 48, 8, 'mosaic_tpu')
  assert not mla_decode.supported(3, 512, 64, 'mosaic_tpu')  # Tq > 2 stays on XLA under 'auto'
  assert not mla_decode.supported(1, 48, 8, 'triton')


def test_auto_switches_follow_the_host():
  """On this CPU host: 'auto' keeps the XLA paths; on a TPU or an FP8 GPU host they take the
  kernels (`platform.host_backend`)."""
  assert jax.default_backend() == 'cpu'
  assert not mla_decode.use_kernel('auto', 1, 512, 64)
  assert fp8_matmul_lib.kernel_impl('auto') == 'auto'
  assert fp8_matmul_lib.kernel_impl('pallas') == 'pallas'

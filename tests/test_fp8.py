"""FP8 block-scaled quantization and GEMMs (V3 report §3.3) against float64 numpy references:
quantize/dequantize round trips (error bound, exact grid values, padding, UE8M0 scales, zero
tiles), fine-grained vs per-tensor scaling on outlier activations, the block-scaled matmul and
FP32 promotion vs a BF16 running sum as I grows, and gradients of the FP8 linear layers."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import fp8
from deepseek_jax.fp8.matmul import matmul

BLOCKS = [(1, 128), (128, 128), (128, 1)]


# ---- float64 numpy references --------------------------------------------------------------------

def tiles_np(x: np.ndarray, block) -> np.ndarray:
  """[..., R, C] -> [..., Rb, br, Cb, bc] float64, zero-padded (independent of quant._tiles)."""
  *lead, R, C = x.shape
  br, bc = block
  Rb, Cb = -(-R // br), -(-C // bc)
  padded = np.zeros((*lead, Rb * br, Cb * bc))
  padded[..., :R, :C] = x
  return padded.reshape(*lead, Rb, br, Cb, bc)


def tile_amax_np(x: np.ndarray, block) -> np.ndarray:
  return np.abs(tiles_np(x, block)).max(axis=(-3, -1))


def rel_fro(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def cosine(a, b) -> float:
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def e4m3_grid() -> np.ndarray:
  """Every finite float8_e4m3fn value, as float64."""
  values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return values[np.isfinite(values)]


def spread_normal(rng, shape) -> np.ndarray:
  """Normal entries whose magnitude varies by ~1e3 from row to row (tests many scales)."""
  return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1, shape[:-1] + (1,))).astype(
      np.float32)


# ---- quantize / dequantize ---------------------------------------------------------------------

@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('pow2_scale', [False, True])
def test_round_trip_error_within_tile_bound(block, pow2_scale):
  x = spread_normal(np.random.default_rng(0), (2, 256, 384))
  values, scales = fp8.quantize(jnp.asarray(x), block, pow2_scale=pow2_scale)
  assert values.dtype == jnp.float8_e4m3fn and scales.dtype == jnp.float32
  back = np.asarray(fp8.dequantize(values, scales, block), np.float64)
  err = np.abs(tiles_np(back - x, block)).max(axis=(-3, -1))
  ratio = (err / tile_amax_np(x, block)).max()
  assert ratio <= 2.0 ** -4, ratio  # 3 mantissa bits: half an ulp is <= 2^-4 of the value
  assert ratio > 2.0 ** -6  # and the bound is not vacuous


@pytest.mark.parametrize('pow2_scale', [False, True])
def test_values_on_the_scaled_grid_come_back_exactly(pow2_scale):
  rng = np.random.default_rng(1)
  grid = e4m3_grid()
  q = rng.choice(grid, size=(256, 256))
  q[::128, ::128] = 448.0  # every 128x128 tile (hence every finer tile holding it) reaches 448
  q[:, ::128] = rng.choice([-448.0, 448.0], size=(256, 2))  # every 1x128 row tile too
  q[::128, :] = rng.choice([-448.0, 448.0], size=(2, 256))  # every 128x1 column tile too
  for block in BLOCKS:
    tile_scale = 2.0 ** rng.integers(-12, 12, size=(256 // block[0], 256 // block[1]))
    x = q * np.repeat(np.repeat(tile_scale, block[0], 0), block[1], 1)
    values, scales = fp8.quantize(jnp.asarray(x, jnp.float32), block, pow2_scale=pow2_scale)
    np.testing.assert_array_equal(np.asarray(scales, np.float64), tile_scale)
    np.testing.assert_array_equal(np.asarray(values, np.float64), q)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(values, scales, block), np.float64), x)


@pytest.mark.parametrize('block', BLOCKS)
def test_padding_keeps_shape_and_every_entry(block):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 130, 200)).astype(np.float32)
  x[:, -1, -1] = 1000.0  # the last entry sits alone in a partial tile: it must survive
  values, scales = fp8.quantize(jnp.asarray(x), block)
  assert values.shape == x.shape
  assert scales.shape == (3, -(-130 // block[0]), -(-200 // block[1]))
  # Partial tiles are scaled by their real entries only (XLA may divide via a reciprocal: 1 ulp).
  np.testing.assert_allclose(np.asarray(scales), tile_amax_np(x, block) / 448.0, rtol=2e-7)
  back = np.asarray(fp8.dequantize(values, scales, block))
  assert back.shape == x.shape
  np.testing.assert_array_equal(back[:, -1, -1], 1000.0)
  assert np.abs(back - x).max() <= 2.0 ** -4 * np.abs(x).max()


def test_pow2_scales_are_powers_of_two_rounded_up():
  x = spread_normal(np.random.default_rng(3), (256, 384))
  values, scales = fp8.quantize(jnp.asarray(x), (128, 128), pow2_scale=True)
  scales = np.asarray(scales, np.float64)
  mantissa, _ = np.frexp(scales)
  np.testing.assert_array_equal(mantissa, 0.5)  # exactly 2^e
  ideal = tile_amax_np(x, (128, 128)) / 448.0
  assert np.all(scales >= ideal) and np.all(scales < 2 * ideal)  # rounded up: no overflow
  assert np.isfinite(np.asarray(values, np.float64)).all()


def test_all_zero_tiles_get_scale_one():
  x = np.zeros((4, 256), np.float32)
  x[1, :128] = np.linspace(-3, 3, 128)
  for pow2_scale in (False, True):
    values, scales = fp8.quantize(jnp.asarray(x), (1, 128), pow2_scale=pow2_scale)
    scales = np.asarray(scales)
    assert np.isfinite(scales).all() and (scales > 0).all()
    assert (scales[[0, 2, 3]] == 1.0).all() and scales[1, 1] == 1.0
    back = np.asarray(fp8.dequantize(values, scales, (1, 128)))
    assert np.isfinite(back).all()
    np.testing.assert_array_equal(back[[0, 2, 3]], 0.0)


# ---- matmul -------------------------------------------------------------------------------------

def test_fine_grained_scaling_survives_outliers():
  """A few activations 1e5x the rest: one scale per tensor pushes every other entry below E4M3's
  smallest subnormal; 1x128 / 128x128 tiles keep the rows without outliers accurate."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((64, 512)).astype(np.float32)
  w = rng.standard_normal((512, 64)).astype(np.float32)
  outlier_rows = np.array([3, 17, 40])
  x[outlier_rows, rng.integers(0, 512, 3)] = 1e5 * np.abs(x).max() * np.array([1, -1, 1])
  clean = np.setdiff1d(np.arange(64), outlier_rows)
  ref = x.astype(np.float64) @ w.astype(np.float64)

  tiled = np.asarray(matmul(jnp.asarray(x), jnp.asarray(w)))
  xv, xs = fp8.quantize(jnp.asarray(x), x.shape)  # one scale for the whole tensor
  wv, ws = fp8.quantize(jnp.asarray(w), w.shape)
  per_tensor = (np.asarray(fp8.dequantize(xv, xs, x.shape), np.float64)
                @ np.asarray(fp8.dequantize(wv, ws, w.shape), np.float64))
  tiled_err = rel_fro(tiled[clean], ref[clean])
  per_tensor_err = rel_fro(per_tensor[clean], ref[clean])
  assert tiled_err < 0.05, tiled_err
  assert per_tensor_err > 5 * tiled_err, (per_tensor_err, tiled_err)
  print(f'outliers: tiled {tiled_err:.4f}, per-tensor {per_tensor_err:.4f}')


@pytest.mark.parametrize('pow2_scale', [False, True])
def test_matmul_matches_float64(pow2_scale):
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 24, 1000)).astype(np.float32)  # I not a multiple of 128
  w = rng.standard_normal((1000, 96)).astype(np.float32)
  y = matmul(jnp.asarray(x), jnp.asarray(w), pow2_scale=pow2_scale)
  assert y.shape == (2, 24, 96) and y.dtype == jnp.float32
  err = rel_fro(y, np.einsum('BTD,DC->BTC', x.astype(np.float64), w.astype(np.float64)))
  assert err <= 0.05, err
  y16 = matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
  assert y16.dtype == jnp.bfloat16


def test_fp32_promotion_stays_exact_while_a_bf16_running_sum_drifts():
  """Against the float64 product of the dequantized operands (so only accumulation is measured).
  Non-negative data, like post-activation inputs: the sum grows with K, and a BF16 running sum's
  ulp approaches each 128-block's contribution (swamping)."""
  errors = {}
  for K in (512, 2048, 16384):
    rng = np.random.default_rng(6)
    x = jnp.asarray(np.abs(rng.standard_normal((16, K))), jnp.float32)
    w = jnp.asarray(np.abs(rng.standard_normal((K, 16))), jnp.float32)
    xv, xs = fp8.quantize(x, fp8.ACT_BLOCK)
    wv, ws = fp8.quantize(w, fp8.WEIGHT_BLOCK)
    exact = (np.asarray(fp8.dequantize(xv, xs, fp8.ACT_BLOCK), np.float64)
             @ np.asarray(fp8.dequantize(wv, ws, fp8.WEIGHT_BLOCK), np.float64))
    errors[K] = {acc: rel_fro(fp8.scaled_matmul(xv, xs, wv, ws, accumulate=acc, impl='jnp'),
                              exact)
                 for acc in ('float32', 'bfloat16')}
    errors[K]['dequant'] = rel_fro(fp8.scaled_matmul(xv, xs, wv, ws, impl='dequant'), exact)
  assert all(e['float32'] < 1e-5 and e['dequant'] < 1e-5 for e in errors.values()), errors
  bf16 = [errors[K]['bfloat16'] for K in (512, 2048, 16384)]
  assert bf16[0] < bf16[1] < bf16[2], errors
  assert bf16[2] > 4 * bf16[0] and bf16[2] > 1e-3, errors


@pytest.mark.parametrize('x_block,w_block', [(fp8.ACT_BLOCK, fp8.WEIGHT_BLOCK),
                                             (fp8.WEIGHT_BLOCK, fp8.TOKEN_BLOCK)])
def test_dequant_impl_equals_the_blockwise_reference(x_block, w_block):
  """The CPU path (one FP32 GEMM of dequantized operands) against the per-I-block reference:
  equal up to FP32 rounding and summation order, for Z, I, O off the 128 grid and for both
  scale layouts (1x128 / 128x128 forward, 128x128 / 128x1 as in wgrad)."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(spread_normal(rng, (150, 300)), jnp.float32)
  w = jnp.asarray(spread_normal(rng, (300, 200)), jnp.float32)
  xv, xs = fp8.quantize(x, x_block)
  wv, ws = fp8.quantize(w, w_block)
  ref = np.asarray(fp8.scaled_matmul(xv, xs, wv, ws, impl='jnp'))
  got = np.asarray(fp8.scaled_matmul(xv, xs, wv, ws, impl='dequant'))
  assert rel_fro(got, ref) < 1e-6
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
  with pytest.raises(ValueError, match='impl'):
    fp8.scaled_matmul(xv, xs, wv, ws, impl='cuda')


# ---- the FP8 linear layers ---------------------------------------------------------------------

def test_linear_gradients_match_float64():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 72, 200)).astype(np.float32)  # 144 tokens, I 200: padded tiles
  w = (rng.standard_normal((200, 136)) / np.sqrt(200)).astype(np.float32)
  g = rng.standard_normal((2, 72, 136)).astype(np.float32)  # dL/dy

  def loss(x, w):
    return jnp.sum(fp8.linear(x, w) * g)

  y = fp8.linear(jnp.asarray(x), jnp.asarray(w))
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  assert rel_fro(y, np.einsum('BTD,DC->BTC', x64, w64)) < 0.05
  assert cosine(dx, np.einsum('BTC,DC->BTD', g64, w64)) >= 0.99
  assert cosine(dw, np.einsum('BTD,BTC->DC', x64, g64)) >= 0.99
  # The forward is exactly the online matmul.
  np.testing.assert_array_equal(np.asarray(y), np.asarray(matmul(jnp.asarray(x), jnp.asarray(w))))


def test_linear_keeps_primal_dtypes():
  x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 256)), jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(9).standard_normal((256, 128)), jnp.float32)
  y, vjp = jax.vjp(fp8.linear, x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  assert dx.shape == x.shape and dw.shape == w.shape


def test_expert_linear_gradients_match_float64():
  rng = np.random.default_rng(10)
  E, M, K, N = 3, 40, 256, 192
  x = rng.standard_normal((E, M, K)).astype(np.float32)
  w = (rng.standard_normal((E, K, N)) / np.sqrt(K)).astype(np.float32)
  g = rng.standard_normal((E, M, N)).astype(np.float32)

  def loss(x, w):
    return jnp.sum(fp8.expert_linear(x, w, pow2_scale=True) * g)

  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  y = fp8.expert_linear(jnp.asarray(x), jnp.asarray(w))
  assert rel_fro(y, np.einsum('EZI,EIO->EZO', x64, w64)) < 0.05
  for e in range(E):  # per expert, so one expert's bad gradient cannot hide among the others
    assert cosine(dx[e], g64[e] @ w64[e].T) >= 0.99
    assert cosine(dw[e], x64[e].T @ g64[e]) >= 0.99

"""Interleaved RoPE with YaRN against a float64 numpy reference written from the definitions.

YaRN (arXiv 2309.00071 §3.2 "NTK-by-parts") as DeepSeek-V2/V3 configure it: dimension pair d
rotates with wavelength 2*pi*base^(2d/R); the pairs that turn more than beta_fast times over the
original context keep their frequency (extrapolation), those that turn fewer than beta_slow times
are divided by the factor (interpolation), with a linear ramp in between. The ramp ends are the
"correction dims" d(beta) = R ln(L / (2 pi beta)) / (2 ln base), floored / ceiled and clamped
to [0, R-1].
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import rope


def rope_cfg(dim=64, theta=10_000.0, factor=40.0, original=4096, beta_fast=32.0, beta_slow=1.0,
             mscale=1.0, mscale_all_dim=1.0) -> ModelConfig:
  return ModelConfig(qk_rope_head_dim=dim, rope_theta=theta, rope_factor=factor,
                     rope_original_max_position=original, rope_beta_fast=beta_fast,
                     rope_beta_slow=beta_slow, rope_mscale=mscale,
                     rope_mscale_all_dim=mscale_all_dim)


def correction_dim_ref(num_rotations, dim, base, original):
  """The pair index d whose wavelength 2 pi base^(2d/dim) fits `num_rotations` times into L."""
  # 2 pi base^(2d/dim) * num_rotations = L  <=>  d = dim ln(L / (2 pi num_rotations)) / (2 ln base)
  return dim * np.log(original / (2.0 * np.pi * num_rotations)) / (2.0 * np.log(base))


def ramp_ends_ref(dim, base, original, beta_fast, beta_slow):
  low = max(int(np.floor(correction_dim_ref(beta_fast, dim, base, original))), 0)
  high = min(int(np.ceil(correction_dim_ref(beta_slow, dim, base, original))), dim - 1)
  return low, high


def inv_freq_ref(dim, base, factor, original, beta_fast, beta_slow):
  """float64 YaRN inverse frequencies [dim/2]."""
  pair = np.arange(dim // 2, dtype=np.float64)
  theta = base ** (-2.0 * pair / dim)  # plain RoPE
  if factor <= 1.0:
    return theta
  low, high = ramp_ends_ref(dim, base, original, beta_fast, beta_slow)
  width = (high - low) if high != low else 0.001  # a zero-width ramp is a step at `low`
  interpolated_share = np.clip((pair - low) / width, 0.0, 1.0)  # 0 below low, 1 above high
  return theta / factor * interpolated_share + theta * (1.0 - interpolated_share)


def mscale_ref(factor, m):
  return 0.1 * m * np.log(factor) + 1.0 if factor > 1 else 1.0


CASES = {
    # name: (dim, theta, factor, original, beta_fast, beta_slow)
    'no_yarn': (64, 10_000.0, 1.0, 4096, 32.0, 1.0),
    'deepseek_v3': (64, 10_000.0, 40.0, 4096, 32.0, 1.0),
    'factor8_orig2048': (32, 10_000.0, 8.0, 2048, 32.0, 1.0),
    'factor16_beta64_2_theta5e5': (64, 500_000.0, 16.0, 8192, 64.0, 2.0),
    'factor2.5_orig128_beta16_2': (16, 10_000.0, 2.5, 128, 16.0, 2.0),
    # Both ends clamp to 0: d(beta_slow) lies in (-1, 0], so low == high == 0 (a step ramp).
    'low_eq_high_at_0': (16, 10_000.0, 4.0, 64, 32.0, 10.2),
    # Both ends clamp to dim-1 = 3: everything extrapolates.
    'low_eq_high_at_top': (4, 10_000.0, 4.0, 2 ** 23, 1.2, 1.0),
}


@pytest.mark.parametrize('name', list(CASES))
def test_inv_frequencies_match_float64_reference(name):
  dim, theta, factor, original, fast, slow = CASES[name]
  got = rope.inv_frequencies(rope_cfg(dim, theta, factor, original, fast, slow))
  assert got.dtype == np.float32 and got.shape == (dim // 2,)
  want = inv_freq_ref(dim, theta, factor, original, fast, slow)
  np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-6, atol=0)


def test_degenerate_cases_really_have_low_equal_high():
  for name, ends in (('low_eq_high_at_0', (0, 0)), ('low_eq_high_at_top', (3, 3))):
    dim, theta, _, original, fast, slow = CASES[name]
    assert ramp_ends_ref(dim, theta, original, fast, slow) == ends, name
  # low == high == 0: pair 0 extrapolates, every other pair is interpolated by the factor.
  dim, theta, factor, original, fast, slow = CASES['low_eq_high_at_0']
  got = rope.inv_frequencies(rope_cfg(dim, theta, factor, original, fast, slow))
  plain = theta ** (-2.0 * np.arange(dim // 2) / dim)
  np.testing.assert_allclose(got[0], 1.0, rtol=1e-7)
  np.testing.assert_allclose(got[1:], plain[1:] / factor, rtol=1e-6)


def test_deepseek_v3_ramp_figures():
  # d(32) = 64 ln(4096 / 64 pi) / (2 ln 1e4) = 10.47 -> 10; d(1) = 22.51 -> 23.
  assert ramp_ends_ref(64, 1e4, 4096, 32.0, 1.0) == (10, 23)
  got = rope.inv_frequencies(ModelConfig()).astype(np.float64)
  plain = 1e4 ** (-np.arange(32) / 32.0)
  np.testing.assert_allclose(got[:11], plain[:11], rtol=1e-6)       # pairs 0..10: unchanged
  np.testing.assert_allclose(got[23:], plain[23:] / 40, rtol=1e-6)  # pairs 23..31: divided by 40
  share = (np.arange(11, 23) - 10) / 13.0                           # the ramp in between
  np.testing.assert_allclose(got[11:23], plain[11:23] * (1 - share + share / 40), rtol=1e-6)


def test_softmax_scale_deepseek_v3():
  cfg = ModelConfig()
  assert cfg.qk_head_dim == 192
  assert rope.softmax_scale(cfg) == pytest.approx(0.1352337788608801, rel=1e-12)
  assert rope.softmax_scale(cfg) == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2,
                                                  rel=1e-12)
  assert rope.softmax_scale(cfg.replace(rope_factor=1.0)) == pytest.approx(192 ** -0.5, rel=1e-12)
  assert rope.cos_sin_scale(cfg) == 1.0  # mscale == mscale_all_dim


def rope_ref(x, positions, inv_freq, scale):
  """x [B, T, ..., R] float64, positions [B, T]: pairs (x0, x1) as x0 + i x1 times e^{i pos w}."""
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  z = pairs[..., 0] + 1j * pairs[..., 1]
  angle = positions[:, :, None].astype(np.float64) * inv_freq[None, None, :]  # [B, T, R/2]
  angle = angle.reshape(angle.shape[:2] + (1,) * (x.ndim - 3) + angle.shape[2:])
  rotated = z * np.exp(1j * angle) * scale
  return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)


@pytest.mark.parametrize('mscale,mscale_all_dim', [(1.0, 1.0), (1.0, 0.707), (0.707, 0.0)])
@pytest.mark.parametrize('heads', [False, True])
def test_apply_rope_is_complex_rotation_of_interleaved_pairs(mscale, mscale_all_dim, heads):
  dim, theta, factor, original, fast, slow = 16, 10_000.0, 8.0, 64, 32.0, 1.0
  cfg = rope_cfg(dim, theta, factor, original, fast, slow, mscale, mscale_all_dim)
  rng = np.random.default_rng(0)
  shape = (2, 5, 3, dim) if heads else (2, 5, dim)
  x = rng.standard_normal(shape).astype(np.float32)
  positions = rng.integers(0, 200, size=(2, 5)).astype(np.int32)
  got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(positions), cfg))
  scale = mscale_ref(factor, mscale) / mscale_ref(factor, mscale_all_dim)
  want = rope_ref(x.astype(np.float64), positions, inv_freq_ref(dim, theta, factor, original,
                                                                  fast, slow), scale)
  # float32 angles pos * w carry ~ 200 * 6e-8 rad of rounding.
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
  # Each pair's length is multiplied by the cos/sin scale exactly.
  norms = lambda a: np.linalg.norm(a.reshape(a.shape[:-1] + (dim // 2, 2)), axis=-1)
  np.testing.assert_allclose(norms(got), scale * norms(x.astype(np.float64)), rtol=2e-6)
  if mscale != mscale_all_dim:
    assert abs(scale - 1.0) > 0.05  # the magnitude case really is tested


def test_position_zero_is_identity():
  x = np.random.default_rng(1).standard_normal((1, 3, 8)).astype(np.float32)
  got = rope.apply_rope(jnp.asarray(x), jnp.zeros((1, 3), jnp.int32), rope_cfg(dim=8))
  np.testing.assert_array_equal(np.asarray(got), x)


def test_scores_depend_only_on_relative_position():
  dim = 16
  cfg = rope_cfg(dim, 10_000.0, 8.0, 64, 32.0, 1.0)
  rng = np.random.default_rng(2)
  q, k = rng.standard_normal((2, dim)).astype(np.float32)
  m = np.array([0, 3, 10, 40, 7, 57], np.int32)
  n = np.array([0, 0, 7, 37, 9, 59], np.int32)  # differences 0, 3, 3, 3, -2, -2
  qr = rope.apply_rope(jnp.broadcast_to(jnp.asarray(q), (1, 6, dim)), jnp.asarray(m)[None], cfg)
  kr = rope.apply_rope(jnp.broadcast_to(jnp.asarray(k), (1, 6, dim)), jnp.asarray(n)[None], cfg)
  dots = np.asarray(jnp.einsum('BTR,BTR->BT', qr, kr))[0]
  # Re(sum_c q_c conj(k_c) e^{i (m - n) w_c}) in float64.
  zq = q[0::2].astype(np.float64) + 1j * q[1::2]
  zk = k[0::2].astype(np.float64) + 1j * k[1::2]
  w = inv_freq_ref(dim, 10_000.0, 8.0, 64, 32.0, 1.0)
  want = np.array([np.real(np.sum(zq * np.conj(zk) * np.exp(1j * (a - b) * w)))
                   for a, b in zip(m, n)])
  np.testing.assert_allclose(dots, want, rtol=0, atol=1e-5)
  assert dots[0] == pytest.approx(float(q @ k), abs=1e-5)
  np.testing.assert_allclose(dots[1:4], dots[1], atol=1e-5)
  np.testing.assert_allclose(dots[4:6], dots[4], atol=1e-5)
  assert abs(dots[1] - dots[0]) > 1e-2 and abs(dots[4] - dots[1]) > 1e-2  # not trivially equal

"""Interleaved (complex-pair) RoPE with YaRN, applied to the decoupled rope dims of MLA only.

YaRN (arXiv 2309.00071) as DeepSeek-V2/V3 use it: frequencies whose wavelength is short compared
with the original context keep extrapolating, long ones are interpolated by `rope_factor`, with a
linear ramp between the correction dims set by beta_fast/beta_slow; attention logits are scaled by
mscale(factor, mscale_all_dim)^2 and cos/sin by mscale(factor, mscale)/mscale(factor, mscale_all_dim).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
  if scale <= 1.0:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
  """The rope dim whose wavelength fits `num_rotations` times into `max_position`."""
  return dim * math.log(max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [R/2] in float32 (the dtype HF and DeepSeek's reference compute them in)."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(base), exponent, dtype=np.float32)
  extrapolation = (1.0 / pos_freqs).astype(np.float32)
  if not cfg.yarn:
    return extrapolation
  interpolation = (1.0 / (np.float32(cfg.rope_factor) * pos_freqs)).astype(np.float32)
  low = math.floor(_correction_dim(cfg.rope_beta_fast, dim, base, cfg.rope_original_max_position))
  high = math.ceil(_correction_dim(cfg.rope_beta_slow, dim, base, cfg.rope_original_max_position))
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (high frequency), 0: interpolate
  return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def cos_sin_scale(cfg: ModelConfig) -> float:
  """YaRN's magnitude correction on cos/sin (1.0 for DeepSeek-V3, where mscale = mscale_all_dim)."""
  if not cfg.yarn:
    return 1.0
  return yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor,
                                                                     cfg.rope_mscale_all_dim)


def softmax_scale(cfg: ModelConfig) -> float:
  """(H + R)^-0.5, times mscale^2 when YaRN is on (DeepSeek-V2 §2.1.3, V3 config)."""
  scale = cfg.qk_head_dim ** -0.5
  if cfg.yarn and cfg.rope_mscale_all_dim:
    scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
  return scale


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Rotates interleaved pairs (x0, x1), (x2, x3), ... of x [B, T, ..., R] by positions [B, T]."""
  inv_freq = jnp.asarray(inv_frequencies(cfg))
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, R/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[2:])
  scale = cos_sin_scale(cfg)
  cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)

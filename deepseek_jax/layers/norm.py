"""RMSNorm: x / sqrt(mean(x^2) + eps) * w, statistics in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.layers import param


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)
  return (weight * normed.astype(x.dtype)).astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float):
    self.weight = param.ones((dim,), ('norm',))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...].astype(x.dtype), self.eps)

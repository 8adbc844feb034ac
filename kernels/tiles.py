"""Padding operands to whole tiles, shared by the Triton and Mosaic layouts of the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(size: int, block: int) -> int:
  """The smallest multiple of `block` that is at least `size`."""
  return -(-size // block) * block


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x zero-padded at the end of each dim up to `shape` (x itself when it has that shape)."""
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])

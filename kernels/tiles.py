"""Padding operands to whole tiles, shared by the Triton and Mosaic layouts of the kernels, and the
outputs' shapes as `pl.pallas_call` wants them inside `jax.shard_map`."""

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


def out_struct(shape: tuple[int, ...], dtype, *operands: jax.Array) -> jax.ShapeDtypeStruct:
  """The ShapeDtypeStruct of a pallas_call output, varying over every mesh axis that one of
  `operands` varies over. Inside `jax.shard_map` (which checks varying axes by default: the FP8
  expert GEMMs run in one) pallas_call refuses an output whose varying axes are not given;
  outside it they are empty and ignored."""
  mats = [jax.typeof(a).mat for a in operands]
  varying = frozenset().union(*(m.varying for m in mats))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))

"""The KV cache's structure, as the model's attention reads and writes it
(deepseek_jax/DESIGN.md, "What MLA caches"). Allocation, sizes and the decode loop are the
decoder's (`inference/cache.py`).

`LatentCache` is what MLA needs: per layer the normed latent c_KV [B, S, C] and the rotated rope
key shared by all heads [B, S, R], (C + R) numbers per token per layer. `NaiveCache` is the
materialized cache of a standard attention implementation, per layer the per-head keys
[B, N, S, H + R] and values [B, N, S, U], kept for comparison and tests.

Both hold `lengths` [B]: the tokens already written for each sequence. A forward pass over T new
tokens at positions lengths[b] + t attends to slots s < lengths[b] and to the new tokens, then
writes their entries at slots lengths[b] .. lengths[b] + T - 1; moving `lengths` is the caller's.
Slots at or beyond a sequence's length are never read, so rolling back a rejected draft is only
lowering `lengths`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct


class HeadsMajor(NamedTuple):
  """W_UK and W_UV with the heads first, as the absorbed products use them (FP8-rounded under
  precision='fp8', as the uncached path's GEMMs see them).

  A decode loop makes them once, outside its body (`inference.cache.with_absorbed_weights`):
  XLA:CPU would otherwise transpose both weights on every step, which cost more than the
  attention itself at S = 512."""
  w_uk: jax.Array  # [N, C, H]
  w_uv: jax.Array  # [N, C, U]


class LatentLayer(NamedTuple):
  c_kv: jax.Array                    # [B, S, C]
  k_rope: jax.Array                  # [B, S, R]
  weights: HeadsMajor | None = None  # made on the fly when None


class NaiveLayer(NamedTuple):
  k: jax.Array  # [B, N, S, H + R], [k_nope; k_rope] with k_rope repeated for every head
  v: jax.Array  # [B, N, S, U]


@struct.dataclass
class LatentCache:
  c_kv: tuple[jax.Array, ...]    # per layer [B, S, C]
  k_rope: tuple[jax.Array, ...]  # per layer [B, S, R]
  lengths: jax.Array             # [B] int32
  weights: tuple[HeadsMajor, ...] | None = None  # per layer; see HeadsMajor

  def layer(self, i: int) -> LatentLayer:
    return LatentLayer(self.c_kv[i], self.k_rope[i],
                       None if self.weights is None else self.weights[i])

  def with_layers(self, layers: list[LatentLayer]) -> 'LatentCache':
    return self.replace(c_kv=tuple(l.c_kv for l in layers), k_rope=tuple(l.k_rope for l in layers))


@struct.dataclass
class NaiveCache:
  k: tuple[jax.Array, ...]  # per layer [B, N, S, H + R]
  v: tuple[jax.Array, ...]  # per layer [B, N, S, U]
  lengths: jax.Array        # [B] int32

  def layer(self, i: int) -> NaiveLayer:
    return NaiveLayer(self.k[i], self.v[i])

  def with_layers(self, layers: list[NaiveLayer]) -> 'NaiveCache':
    return self.replace(k=tuple(l.k for l in layers), v=tuple(l.v for l in layers))


Cache = LatentCache | NaiveCache
LayerCache = LatentLayer | NaiveLayer


def slot_positions(lengths: jax.Array, num_new: int) -> jax.Array:
  """[B, T] positions (= cache slots) of T new tokens: lengths[b] + t."""
  return lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]

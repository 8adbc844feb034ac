"""KV caches for decoding, preallocated to a maximum length S, one slot row per sequence.

`LatentCache` is what MLA needs (DESIGN.md, "What MLA caches"): per layer the normed latent c_KV
[B, S, C] and the rotated rope key shared by all heads [B, S, R], (C + R) numbers per token per
layer. `NaiveCache` is the materialized cache of a standard attention implementation, per layer
the per-head keys [B, N, S, H + R] and values [B, N, S, U], kept for comparison and tests.

Both hold `lengths` [B]: the tokens already written for each sequence. A forward pass over T new
tokens at positions lengths[b] + t attends to slots s < lengths[b] and to the new tokens, then
writes their entries at slots lengths[b] .. lengths[b] + T - 1, so a batch of prompts of
different lengths decodes together (prompts right-padded: the padding's entries land beyond each
length and are overwritten by later steps). Slots at or beyond a sequence's length are never read,
so rolling back a rejected draft is only lowering `lengths`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from deepseek_jax.config import ModelConfig
from kernels import mla_decode

MODES = ('absorbed', 'naive')  # absorbed: LatentCache + weight absorption; naive: NaiveCache


class LatentLayer(NamedTuple):
  c_kv: jax.Array    # [B, S, C]
  k_rope: jax.Array  # [B, S, R]


class NaiveLayer(NamedTuple):
  k: jax.Array  # [B, N, S, H + R], [k_nope; k_rope] with k_rope repeated for every head
  v: jax.Array  # [B, N, S, U]


@struct.dataclass
class LatentCache:
  c_kv: tuple[jax.Array, ...]    # per layer [B, S, C]
  k_rope: tuple[jax.Array, ...]  # per layer [B, S, R]
  lengths: jax.Array             # [B] int32

  def layer(self, i: int) -> LatentLayer:
    return LatentLayer(self.c_kv[i], self.k_rope[i])

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


def init(cfg: ModelConfig, batch: int, max_len: int, mode: str = 'absorbed',
         num_layers: int | None = None, dtype: str | None = None) -> Cache:
  """An empty cache of `num_layers` (default: the main model's) in the activation dtype, with
  max_len rounded up to a multiple of 64 slots where the decode kernel will read it (so the
  kernel never pads, i.e. copies, the cache)."""
  if mode not in MODES:
    raise ValueError(f'cache mode {mode!r}: must be one of {MODES}')
  if max_len < 1:
    raise ValueError(f'max_len={max_len}: the cache needs at least one slot')
  if mode == 'absorbed' and mla_decode.use_kernel(cfg.mla_decode_kernel, 1, cfg.kv_lora_rank,
                                                   cfg.qk_rope_head_dim):
    max_len = -(-max_len // mla_decode.BLOCK_S) * mla_decode.BLOCK_S  # the kernel's step
  L = cfg.num_layers if num_layers is None else num_layers
  dt = jnp.dtype(dtype or cfg.dtype)
  B, S, N = batch, max_len, cfg.num_heads
  lengths = jnp.zeros((B,), jnp.int32)
  if mode == 'absorbed':
    return LatentCache(
        c_kv=tuple(jnp.zeros((B, S, cfg.kv_lora_rank), dt) for _ in range(L)),
        k_rope=tuple(jnp.zeros((B, S, cfg.qk_rope_head_dim), dt) for _ in range(L)),
        lengths=lengths)
  return NaiveCache(
      k=tuple(jnp.zeros((B, N, S, cfg.qk_head_dim), dt) for _ in range(L)),
      v=tuple(jnp.zeros((B, N, S, cfg.v_head_dim), dt) for _ in range(L)),
      lengths=lengths)


def max_len(cache: Cache) -> int:
  first = cache.c_kv[0] if isinstance(cache, LatentCache) else cache.k[0]
  return first.shape[-2]


def nbytes(cache: Cache) -> int:
  """Bytes of the key/value buffers (lengths excluded); works on `jax.eval_shape` results."""
  buffers = cache.c_kv + cache.k_rope if isinstance(cache, LatentCache) else cache.k + cache.v
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in buffers)


def bytes_per_token(cache: Cache) -> int:
  """Cache bytes one token occupies over all layers: (C + R) x L x itemsize for `LatentCache`."""
  slots = cache.lengths.shape[0] * max_len(cache)
  total = nbytes(cache)
  assert total % slots == 0, (total, slots)
  return total // slots


def abstract_bytes_per_token(cfg: ModelConfig, mode: str = 'absorbed',
                             dtype: str | None = None) -> int:
  """`bytes_per_token` of a cache for `cfg` through `jax.eval_shape`: no memory, any model size."""
  return bytes_per_token(jax.eval_shape(lambda: init(cfg, 1, 1, mode, dtype=dtype)))


def slot_positions(lengths: jax.Array, num_new: int) -> jax.Array:
  """[B, T] positions (= cache slots) of T new tokens: lengths[b] + t."""
  return lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]

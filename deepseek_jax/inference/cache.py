"""KV caches for decoding, preallocated to a maximum length S, one slot row per sequence: their
allocation, sizes, and the heads-major weights a decode loop attaches to them. The structure the
model reads and writes (`LatentCache`, `NaiveCache`, `lengths`) is `layers/kv_cache.py`'s.

A batch of prompts of different lengths decodes together (prompts right-padded: the padding's
entries land beyond each length and are overwritten by later steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.kv_cache import (Cache, HeadsMajor, LatentCache, LatentLayer, NaiveCache,
                                          NaiveLayer, slot_positions)
from deepseek_jax.layers.mla import MLA
from kernels import mla_decode

__all__ = ['Cache', 'HeadsMajor', 'LatentCache', 'LatentLayer', 'NaiveCache', 'NaiveLayer',
           'MODES', 'abstract_bytes_per_token', 'bytes_per_token', 'init', 'max_len', 'nbytes',
           'slot_positions', 'absorbed_weights', 'with_weights', 'shardings']

MODES = ('absorbed', 'naive')  # absorbed: LatentCache + weight absorption; naive: NaiveCache


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


def absorbed_weights(attns: Sequence[MLA], cfg: ModelConfig) -> tuple[HeadsMajor, ...]:
  """Each attention layer's heads-major W_UK, W_UV (`MLA.heads_major`) in the activation dtype:
  a decode loop makes them once, before its body, and attaches them with `with_weights`."""
  return tuple(attn.heads_major(jnp.dtype(cfg.dtype)) for attn in attns)


def with_weights(cache: Cache, weights: tuple[HeadsMajor, ...] | None) -> Cache:
  """The cache carrying `weights` (None: carrying none); a `NaiveCache` has no use for them."""
  return cache.replace(weights=weights) if isinstance(cache, LatentCache) else cache


def shardings(cache, mesh: jax.sharding.Mesh):
  """NamedShardings of a cache (arrays or `jax.eval_shape` structs): every array [B, ...] split
  over the batch axes, as the tokens are."""
  return jax.tree.map(lambda x: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(sharding.BATCH, *[None] * (x.ndim - 1))), cache)

"""Plain-jnp references for the Pallas kernels: the semantics each kernel must reproduce.

`mla_decode`: absorbed attention of Tq new queries per sequence over the latent cache, with
FlashMLA's length convention. `fp8_matmul`: the block-scaled FP8 GEMM of `deepseek_jax.fp8`
(one FP8 product per 128-wide K block, scaled and added to an FP32 sum). They are also the
'xla' side of each kernel's switch where the model has no faster XLA path of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.fp8.matmul import scaled_matmul


def visible(lengths: jax.Array, num_queries: int) -> jax.Array:
  """[B, Tq]: how many cache slots query t of sequence b sees, lengths[b] - (Tq - 1 - t), at
  least 0. `lengths` counts the cached tokens including the Tq new ones (FlashMLA's convention),
  so the last query sees all of them and query t the causal prefix ending at its own slot."""
  t = jnp.arange(num_queries, dtype=jnp.int32)
  return jnp.maximum(lengths.astype(jnp.int32)[:, None] - (num_queries - 1 - t)[None, :], 0)


def mla_decode(q_latent: jax.Array, q_rope: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
               lengths: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """Absorbed queries over the latent cache, in float32.

  q_latent [B, Tq, N, C] (q_nope W_UK^T), q_rope [B, Tq, N, R], c_kv [B, S, C], k_rope [B, S, R],
  lengths [B] -> (o [B, Tq, N, C] in q_latent's dtype, lse [B, Tq, N] float32), where
    score[s] = scale (q_latent . c_kv[s] + q_rope . k_rope[s])  for s < visible(lengths)[b, t]
    o = softmax(score) . c_kv,  lse = log sum_s exp(score[s]).
  A query that sees no slot (lengths small enough) gets o = 0 and lse = -inf.
  """
  f32 = jnp.float32
  scores = (jnp.einsum('BTNC,BSC->BTNS', q_latent.astype(f32), c_kv.astype(f32),
                       precision=jax.lax.Precision.HIGHEST)
            + jnp.einsum('BTNR,BSR->BTNS', q_rope.astype(f32), k_rope.astype(f32),
                         precision=jax.lax.Precision.HIGHEST)) * scale
  S = c_kv.shape[1]
  seen = jnp.arange(S)[None, None, :] < visible(lengths, q_latent.shape[1])[:, :, None]  # B T S
  scores = jnp.where(seen[:, :, None, :], scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)  # -inf where nothing is seen
  probs = jnp.where(seen[:, :, None, :], jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse,
                                                                    0.0)[..., None]), 0.0)
  o = jnp.einsum('BTNS,BSC->BTNC', probs, c_kv.astype(f32), precision=jax.lax.Precision.HIGHEST)
  return o.astype(q_latent.dtype), lse


def gather_pages(pool: jax.Array, block_table: jax.Array) -> jax.Array:
  """A paged cache made contiguous: pool [P, page, X], block_table [B, pages] -> [B, pages x
  page, X], slot s of sequence b from row s % page of page block_table[b, s // page]."""
  B, pages = block_table.shape
  return pool[block_table].reshape(B, pages * pool.shape[1], pool.shape[2])


def fp8_matmul(a_values: jax.Array, a_scales: jax.Array, b_values: jax.Array,
               b_scales: jax.Array, out_dtype=jnp.float32) -> jax.Array:
  """E4M3 a [M, K] with 1x128 scales [M, K/128] . E4M3 b [K, N] with 128x128 scales
  [K/128, N/128] -> [M, N] out_dtype: per 128-wide K block one FP8 product accumulated in FP32,
  multiplied by both blocks' scales and added to an FP32 sum (V3 §3.3's promotion)."""
  return scaled_matmul(a_values, a_scales, b_values, b_scales, impl='jnp').astype(out_dtype)

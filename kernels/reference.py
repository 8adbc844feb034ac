"""Plain-jnp references for the Pallas kernels: the semantics each kernel must reproduce.

`mla_decode`: absorbed attention of Tq new queries per sequence over the latent cache, with
FlashMLA's length convention. `fp8_matmul`: the block-scaled FP8 GEMM (V3 report §3.3: one FP8
product per 128-wide I block, scaled and added to an FP32 sum); `block_scaled_matmul` is its
scan over I blocks, which `deepseek_jax.fp8` also runs as its 'jnp' GEMM. They are also the
'xla' side of each kernel's switch where the model has no faster XLA path of its own.

Dependencies point one way: `deepseek_jax` imports `kernels`, never the reverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK_K = 128  # N_C: I elements per FP8 partial product before promotion to FP32


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
  """A paged cache made contiguous: pool [pages, page, ...], block_table [B, pages] -> [B, pages x
  page, ...], slot s of sequence b from row s % page of page block_table[b, s // page]."""
  B, pages = block_table.shape
  return pool[block_table].reshape(B, pages * pool.shape[1], pool.shape[2])


def fp8_matmul(a_values: jax.Array, a_scales: jax.Array, b_values: jax.Array,
               b_scales: jax.Array, out_dtype=jnp.float32) -> jax.Array:
  """E4M3 a [Z, I] with 1x128 scales [Z, I/128] . E4M3 b [I, O] with 128x128 scales
  [I/128, O/128] -> [Z, O] out_dtype: per 128-wide I block one FP8 product accumulated in FP32,
  multiplied by both blocks' scales and added to an FP32 sum (V3 §3.3's promotion).
  b_scales may also be [I/128, O] (128x1 tiles)."""
  N = b_values.shape[1]
  return block_scaled_matmul(a_values, per_line(a_scales, a_values.shape[0], axis=0), b_values,
                             per_line(b_scales, N, axis=1)).astype(out_dtype)


def block_scaled_matmul(x_values: jax.Array, x_scales: jax.Array, w_values: jax.Array,
                        w_scales: jax.Array, accumulate: str = 'float32') -> jax.Array:
  """x_values [Z, I], x_scales [Z, I/128] (per row), w_values [I, O], w_scales [I/128, O] (per
  column) -> float32 [Z, O]: literally one FP8 GEMM per 128-wide I block, scaled and added in FP32.
  accumulate='bfloat16' rounds the running sum to BF16 after every block (a stand-in for a
  low-precision accumulator)."""
  M, K = x_values.shape
  N = w_values.shape[1]
  Kb = x_scales.shape[1]
  pad = Kb * BLOCK_K - K  # zero-padding I adds nothing to any product
  x_blocks = jnp.pad(x_values, ((0, 0), (0, pad))).reshape(M, Kb, BLOCK_K).transpose(1, 0, 2)
  w_blocks = jnp.pad(w_values, ((0, pad), (0, 0))).reshape(Kb, BLOCK_K, N)

  def add_block(acc, block):
    xb, wb, xs, ws = block  # [Z, i], [i, O], [Z], [O]
    partial = jnp.einsum('Zi,iO->ZO', xb, wb, preferred_element_type=jnp.float32)
    acc = acc + partial * xs[:, None] * ws[None, :]  # promotion: scale in FP32, add in FP32
    if accumulate == 'bfloat16':
      acc = acc.astype(jnp.bfloat16).astype(jnp.float32)
    return acc, None

  blocks = (x_blocks, w_blocks, x_scales.T, w_scales)  # [b, Z, i], [b, i, O], [b, Z], [b, O]
  # The sum starts from the first block's product rather than from zeros, so that inside
  # jax.shard_map it varies over the operands' mesh axes, as the loop's body makes it.
  first, _ = add_block(jnp.float32(0), jax.tree.map(lambda a: a[0], blocks))
  acc, _ = jax.lax.scan(add_block, first, jax.tree.map(lambda a: a[1:], blocks))
  return acc


def per_line(scales: jax.Array, size: int, axis: int) -> jax.Array:
  """Scales along `axis` either per line (`size` of them) or per 128 lines: make them per line."""
  n = scales.shape[axis]
  if n == size:
    return scales.astype(jnp.float32)
  if n == -(-size // BLOCK_K):
    repeated = jnp.repeat(scales, BLOCK_K, axis=axis, total_repeat_length=n * BLOCK_K)
    return jax.lax.slice_in_dim(repeated, 0, size, axis=axis).astype(jnp.float32)
  raise ValueError(f'scaled_matmul: {n} scales along axis {axis} fit neither {size} lines nor '
                   f'blocks of {BLOCK_K}')

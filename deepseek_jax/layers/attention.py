"""The attention cores of MLA, as pure functions of arrays (`layers/mla.py` owns the weights).

- `attend`: training / prefill without a cache, softmax(q.k * scale) v over per-head keys, with
  its backward pass written out; it keeps the [B, N, T, S] probabilities for that pass.
- `blockwise_attend`: the same without ever forming [T, S] (flash-style: an online softmax over
  key blocks, the backward pass recomputing each block's probabilities from the saved
  log-sum-exp); memory grows with T, not T². `self_attend` picks one by `ModelConfig.attention`.
- `absorbed`: T new tokens against the latent cache (DeepSeek-V2 §2.1.2, "absorb";
  deepseek_jax/DESIGN.md, "What MLA caches"):

      q_lat  = q_nope W_UK^T                       [B, T, N, C]   W_UK folded into the query
      scores = q_lat . c_KV + q_rope . k_rope      [B, N, T, S]   against the cache as it is
      o_lat  = softmax(scores) c_KV                [B, T, N, C]   the output stays latent
      o      = o_lat W_UV                          [B, T, N, U]   (then W_O, in the module)

  since q_nope . k_nope = q_nope . (c_KV W_UK) = (q_nope W_UK^T) . c_KV, and likewise for the
  values. No per-head key or value of a cached token is ever formed: the work per cached token
  is N (C + R) + N C multiply-adds reading C + R numbers, against N (H + R) + N U reading
  N (H + R + U).
- `naive`: the same over a materialized per-head cache.

With a cache, the T new tokens attend to the cache as it was (slots s < lengths[b], earlier
tokens) and to each other (causally) under one softmax; their own entries are written after the
cache has been read, so a donated cache is updated in place. Letters beyond those of
deepseek_jax/DESIGN.md: J the new tokens as keys (J = T), Z = T x N, A = H + R (the score dim
of `attend` and `naive`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.layers import linear
from deepseek_jax.layers.kv_cache import HeadsMajor, LatentLayer, NaiveLayer
from kernels import mla_decode

# ---- without a cache ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """softmax(q.k * scale, masked) v for q [B, N, T, A], k [B, N, S, A], v [B, N, S, U].

  The backward pass is written out (the standard softmax-attention gradients from the saved
  probabilities) so that XLA:CPU does not recompute the softmax inside its transposes."""
  return _attend_forward(q, k, v, mask, scale)[0]


def _attend_forward(q, k, v, mask, scale):
  scores = jnp.einsum('BNTA,BNSA->BNTS', q, k, preferred_element_type=jnp.float32)
  probs = masked_softmax(scores * scale, mask).astype(q.dtype)
  return jnp.einsum('BNTS,BNSU->BNTU', probs, v), probs


def _attend_fwd(q, k, v, mask, scale):
  out, probs = _attend_forward(q, k, v, mask, scale)
  return out, (q, k, v, probs, out)


def _attend_bwd(scale, residuals, d_out):
  q, k, v, probs, out = residuals
  d_v = jnp.einsum('BNST,BNTU->BNSU', linear.transposed(probs), d_out)
  d_probs = jnp.einsum('BNTU,BNSU->BNTS', d_out, v, preferred_element_type=jnp.float32)
  # softmax backward: d_scores = p * (dp - sum_s p dp), and sum_s p dp = sum_u dO O.
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs.astype(jnp.float32) * (d_probs - row) * scale).astype(q.dtype)
  d_q = jnp.einsum('BNTS,BNSA->BNTA', d_scores, k)
  d_k = jnp.einsum('BNST,BNTA->BNSA', linear.transposed(d_scores), q)
  return d_q, d_k, d_v, None


attend.defvjp(_attend_fwd, _attend_bwd)


def causal_mask(positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """[B, 1, T, S] boolean: query t sees key s iff pos(s) <= pos(t) (and the same segment)."""
  mask = positions[:, None, :, None] >= positions[:, None, None, :]
  if segment_ids is not None:
    mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return mask


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis in float32; fully masked rows give zeros, not NaN."""
  scores = jnp.where(mask, scores, -jnp.inf)
  # The shift cancels in the softmax; without stop_gradient autodiff builds an argmax mask.
  peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
  return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)


# ---- without a cache, blockwise ------------------------------------------------------------------

# 512 queries x 512 keys (clipped to T and S): a float32 score block of 1 MiB per head and sequence,
# many MXU / tensor-core tiles, and 1/64 of [T, S] at V3's T = 4096.
BLOCK_Q = 512
BLOCK_K = 512


def self_attend(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                segment_ids: jax.Array | None, scale: float, implementation: str = 'auto'
                ) -> jax.Array:
  """Causal (and, with segment_ids [B, T], document-masked) self-attention without a cache for
  q [B, N, T, A], k [B, N, T, A], v [B, N, T, U] at positions [B, T] -> [B, N, T, U].

  `implementation` is `ModelConfig.attention`: 'dense' (`attend`, whose written-out backward is
  what XLA:CPU runs fastest), 'blockwise' (`blockwise_attend`), or 'auto': dense when lowered
  for a CPU, blockwise elsewhere. The choice follows the platform being lowered for
  (`jax.lax.platform_dependent`), not the host's backend: compiling ahead of time for a TPU on
  a CPU host takes the blockwise form."""
  dense = lambda: attend(q, k, v, causal_mask(positions, segment_ids), scale)
  blockwise = lambda: blockwise_attend(q, k, v, positions, positions, segment_ids, segment_ids,
                                       scale)
  if implementation == 'dense':
    return dense()
  if implementation == 'blockwise':
    return blockwise()
  return jax.lax.platform_dependent(cpu=dense, default=blockwise)


def blockwise_attend(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_positions: jax.Array, q_segments: jax.Array | None = None,
                     k_segments: jax.Array | None = None, scale: float = 1.0,
                     block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> jax.Array:
  """`attend` for q [B, N, T, A], k [B, N, S, A], v [B, N, S, U], with the mask given as
  positions (query t sees key s iff k_positions[s] <= q_positions[t]) and optional segment ids
  ([B, T] and [B, S]: only equal ids see each other), never as a [T, S] array.

  Online softmax over blocks of `block_k` keys for each block of `block_q` queries (T and S
  padded to whole blocks, the padding masked); statistics in float32; a fully masked row gives
  zeros, as `masked_softmax`. The backward pass keeps only q, k, v, the output and each row's
  log-sum-exp, and recomputes the probabilities block by block."""
  if q_segments is None or k_segments is None:
    q_segments = jnp.zeros(q_positions.shape, jnp.int32)
    k_segments = jnp.zeros(k_positions.shape, jnp.int32)
  block_q, block_k = min(block_q, q.shape[2]), min(block_k, k.shape[2])
  return _blockwise(q, k, v, q_positions, k_positions, q_segments, k_segments, scale, block_q,
                    block_k)


def _split(x: jax.Array, axis: int, block: int) -> jax.Array:
  """x with `axis` (length L) zero-padded to whole blocks and cut into them, the count of blocks
  leading: [..., L, ...] -> [L/block, ..., block, ...]."""
  length = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -length % block)
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:axis] + (-1, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _merge(x: jax.Array, axis: int, length: int) -> jax.Array:
  """The inverse of `_split`: [L/block, ..., block, ...] -> [..., L, ...] without the padding."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _key_blocks(k, v, k_positions, k_segments, block_k):
  """Keys, values, their positions, segments and validity (False on the padding), in blocks."""
  valid = jnp.ones((1, k.shape[2]), bool)
  return (_split(k, 2, block_k), _split(v, 2, block_k), _split(k_positions, 1, block_k),
          _split(k_segments, 1, block_k), _split(valid, 1, block_k))


def _block_mask(q_positions, q_segments, k_positions, k_segments, valid):
  """[B, 1, t, s]: query t of the block sees key s of the block (causal, same segment, real)."""
  mask = q_positions[:, None, :, None] >= k_positions[:, None, None, :]
  mask &= q_segments[:, None, :, None] == k_segments[:, None, None, :]
  return mask & valid[:, None, None, :]


def _tied(carry, mask_inputs):
  """(carry, mask_inputs) through an optimization barrier: the block's mask then depends on the
  loop's carry, and XLA cannot compute every block's mask ahead of the loops, which it does when
  positions are not constants (a [T/t, S/s, B, 1, t, s] array, growing with T^2)."""
  return jax.lax.optimization_barrier((carry, mask_inputs))


def _block_scores(q, k, scale):
  return jnp.einsum('BNtA,BNsA->BNts', q, k, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _blockwise(q, k, v, q_positions, k_positions, q_segments, k_segments, scale, block_q,
               block_k):
  return _blockwise_forward(q, k, v, q_positions, k_positions, q_segments, k_segments, scale,
                            block_q, block_k)[0]


def _blockwise_forward(q, k, v, q_positions, k_positions, q_segments, k_segments, scale, block_q,
                       block_k):
  """-> out [B, N, T, U] and the log-sum-exp of each row, in query blocks [T/t, B, N, t, 1]
  (+inf on a fully masked row, so that exp(score - lse) is 0 there)."""
  B, N, T, _ = q.shape
  U = v.shape[-1]
  keys = _key_blocks(k, v, k_positions, k_segments, block_k)

  def query_block(query):
    q_i, position_i, segment_i = query  # [B, N, t, A], [B, t], [B, t]

    def key_block(carry, key):
      k_j, v_j, position_j, segment_j, valid_j = key
      carry, mask_inputs = _tied(carry, (position_i, segment_i, position_j, segment_j, valid_j))
      peak, total, acc = carry  # [B, N, t, 1], [B, N, t, 1], [B, N, t, U] float32
      mask = _block_mask(*mask_inputs)
      scores = jnp.where(mask, _block_scores(q_i, k_j, scale), -jnp.inf)
      new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1, keepdims=True))
      shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
      probs = jnp.where(mask, jnp.exp(scores - shift), 0.0)
      rescale = jnp.exp(peak - shift)  # 0 while the row has seen nothing
      total = total * rescale + jnp.sum(probs, axis=-1, keepdims=True)
      acc = acc * rescale + jnp.einsum('BNts,BNsU->BNtU', probs.astype(v_j.dtype), v_j,
                                       preferred_element_type=jnp.float32)
      return (new_peak, total, acc), None

    rows = q_i.shape[:3] + (1,)
    init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros(q_i.shape[:3] + (U,), jnp.float32))
    (peak, total, acc), _ = jax.lax.scan(key_block, init, keys)
    out = (acc / jnp.maximum(total, 1e-30)).astype(q.dtype)
    lse = jnp.where(total > 0, jnp.where(jnp.isfinite(peak), peak, 0.0) + jnp.log(total), jnp.inf)
    return out, lse

  queries = (_split(q, 2, block_q), _split(q_positions, 1, block_q),
             _split(q_segments, 1, block_q))
  out, lse = jax.lax.map(query_block, queries)  # [T/t, B, N, t, U], [T/t, B, N, t, 1]
  return _merge(out, 2, T), lse


def _blockwise_fwd(q, k, v, q_positions, k_positions, q_segments, k_segments, scale, block_q,
                   block_k):
  out, lse = _blockwise_forward(q, k, v, q_positions, k_positions, q_segments, k_segments, scale,
                                block_q, block_k)
  return out, (q, k, v, q_positions, k_positions, q_segments, k_segments, out, lse)


def _blockwise_bwd(scale, block_q, block_k, residuals, d_out):
  q, k, v, q_positions, k_positions, q_segments, k_segments, out, lse = residuals
  dt = q.dtype
  # sum_s p dp = sum_u dO O per row, as in `_attend_bwd`.
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  queries = (_split(q, 2, block_q), _split(d_out, 2, block_q), lse, _split(row, 2, block_q),
             _split(q_positions, 1, block_q), _split(q_segments, 1, block_q))

  def key_block(d_q, key):  # d_q [T/t, B, N, t, A] float32, accumulated over the key blocks
    k_j, v_j, position_j, segment_j, valid_j = key

    def query_block(carry, query):
      (q_i, d_out_i, lse_i, row_i, position_i, segment_i), d_q_i = query
      carry, mask_inputs = _tied(carry, (position_i, segment_i, position_j, segment_j, valid_j))
      d_k, d_v = carry  # [B, N, s, A], [B, N, s, U] float32
      mask = _block_mask(*mask_inputs)
      probs = jnp.where(mask, jnp.exp(_block_scores(q_i, k_j, scale) - lse_i), 0.0)
      d_v += jnp.einsum('BNts,BNtU->BNsU', probs.astype(dt), d_out_i,
                        preferred_element_type=jnp.float32)
      d_probs = jnp.einsum('BNtU,BNsU->BNts', d_out_i, v_j, preferred_element_type=jnp.float32)
      d_scores = (probs * (d_probs - row_i) * scale).astype(dt)
      d_q_i += jnp.einsum('BNts,BNsA->BNtA', d_scores, k_j, preferred_element_type=jnp.float32)
      d_k += jnp.einsum('BNts,BNtA->BNsA', d_scores, q_i, preferred_element_type=jnp.float32)
      return (d_k, d_v), d_q_i

    init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))
    (d_k, d_v), d_q = jax.lax.scan(query_block, init, (queries, d_q))
    return d_q, (d_k, d_v)

  d_q = jnp.zeros(queries[0].shape, jnp.float32)
  d_q, (d_k, d_v) = jax.lax.scan(key_block, d_q,
                                 _key_blocks(k, v, k_positions, k_segments, block_k))
  T, S = q.shape[2], k.shape[2]
  return (_merge(d_q, 2, T).astype(dt), _merge(d_k, 2, S).astype(k.dtype),
          _merge(d_v, 2, S).astype(v.dtype), None, None, None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- with a cache ------------------------------------------------------------------------------


def write(buffer: jax.Array, new: jax.Array, positions: jax.Array, slot_axis: int) -> jax.Array:
  """buffer with sequence b's new[b] stored at slots positions[b, 0] .. positions[b, 0] + T - 1
  of `slot_axis` (1: buffer [B, S, ...], new [B, T, ...]; 2: buffer [B, N, S, ...], new [B, T, N, ...]).

  One dynamic_update_slice per sequence, in place on a donated buffer (a scatter with
  mode='drop' became a select over the whole cache on XLA:CPU). A start past S - T is clamped:
  callers keep every generating sequence's writes inside the cache."""
  if slot_axis == 2:
    new = jnp.swapaxes(new, 1, 2)  # [B, N, T, X]
  new = new.astype(buffer.dtype)
  zeros = (0,) * (buffer.ndim - 1 - slot_axis)
  for b in range(buffer.shape[0]):
    start = (b,) + (0,) * (slot_axis - 1) + (positions[b, 0],) + zeros
    buffer = jax.lax.dynamic_update_slice(buffer, new[b:b + 1], start)
  return buffer


def after(x: jax.Array, dependency: jax.Array) -> jax.Array:
  """x, with a data edge from `dependency` (x + 0 * one element of it). XLA:CPU updates a donated
  cache in place only when the update depends on the cache's last read; without the edge it
  copies the whole cache, twice, on every step."""
  return x + jnp.zeros((), x.dtype) * dependency.reshape(-1)[0].astype(x.dtype)


def split_masks(positions: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
  """Masks for T new tokens at positions [B, T] = lengths[b] + t, as [B, 1, T, S] over the cache
  slots (slot s holds a valid earlier token iff s < lengths[b]) and [B, 1, T, J] over the new
  tokens themselves (causal: t sees j <= t)."""
  lengths = positions[:, :1]  # [B, 1]
  slots = jnp.arange(num_slots, dtype=jnp.int32)
  cached = jnp.broadcast_to((slots[None, :] < lengths)[:, None, None, :],
                            (positions.shape[0], 1, positions.shape[1], num_slots))
  T = positions.shape[1]
  causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]  # [T, J]
  return cached, jnp.broadcast_to(causal[None, None], (positions.shape[0], 1, T, T))


def joint_softmax(cached_scores: jax.Array, new_scores: jax.Array, positions: jax.Array,
                  scale: float) -> tuple[jax.Array, jax.Array]:
  """Softmax over the cache slots and the new tokens together: scores [B, N, T, S] and
  [B, N, T, J] -> probabilities of the same shapes (float32)."""
  S = cached_scores.shape[-1]
  cached_mask, new_mask = split_masks(positions, S)
  scores = jnp.concatenate([cached_scores, new_scores], axis=-1).astype(jnp.float32) * scale
  probs = masked_softmax(scores, jnp.concatenate([cached_mask, new_mask], axis=-1))
  return probs[..., :S], probs[..., S:]


def absorbed(q_nope: jax.Array, q_rope: jax.Array, c_new: jax.Array, k_rope_new: jax.Array,
             positions: jax.Array, layer: LatentLayer, weights: HeadsMajor, scale: float,
             kernel: str = 'xla') -> tuple[jax.Array, LatentLayer]:
  """New tokens' q_nope [B, T, N, H], q_rope [B, T, N, R], latent c_new [B, T, C] and rope key
  [B, T, R] at positions [B, T] against the latent cache -> (o [B, T, N, U], updated layer).

  `kernel` is `ModelConfig.mla_decode_kernel`: 'xla' (the einsums below), 'pallas'
  (`kernels/mla_decode.py`), or 'auto' (the kernel where `mla_decode.use_kernel` says it fits);
  on a mesh the kernel runs per device on its rows of the batch, if the batch splits evenly."""
  dt = q_nope.dtype
  c_kv, k_rope = layer.c_kv.astype(dt), layer.k_rope.astype(dt)  # [B, S, C], [B, S, R]
  B, T, N, _ = q_nope.shape
  S = c_kv.shape[1]
  q_lat = jnp.einsum('BTNH,NCH->BTNC', q_nope, weights.w_uk.astype(dt))
  if (mla_decode.use_kernel(kernel, T, c_kv.shape[-1], k_rope.shape[-1])
      and mla_decode.splits_batch(B)):
    return _absorbed_kernel(q_lat, q_rope, c_new, k_rope_new, positions, layer, weights, scale)
  # The products over the cache are two plain GEMMs per sequence, with the new tokens' heads as
  # one dimension Z = T x N and the scores S-major (on XLA:CPU about 2x faster than the same
  # einsums with T and N apart, or with S minor, at S = 8192); the softmax sees them transposed.
  cached_scores = (jnp.einsum('BZC,BSC->BSZ', q_lat.reshape(B, T * N, -1), c_kv)
                   + jnp.einsum('BZR,BSR->BSZ', q_rope.reshape(B, T * N, -1), k_rope))
  new_scores = (jnp.einsum('BTNC,BJC->BNTJ', q_lat, c_new)
                + jnp.einsum('BTNR,BJR->BNTJ', q_rope, k_rope_new))
  cached_scores = jnp.transpose(cached_scores.reshape(B, S, T, N), (0, 3, 2, 1))  # [B, N, T, S]
  cached_probs, new_probs = joint_softmax(cached_scores, new_scores, positions, scale)
  cached_probs = jnp.transpose(cached_probs, (0, 3, 2, 1)).reshape(B, S, T * N).astype(dt)
  o_lat = (jnp.einsum('BSZ,BSC->BZC', cached_probs, c_kv).reshape(B, T, N, -1)
           + jnp.einsum('BNTJ,BJC->BTNC', new_probs.astype(dt), c_new))  # [B, T, N, C]
  o = jnp.einsum('BTNC,NCU->BTNU', o_lat, weights.w_uv.astype(dt))
  # Written after the cache was read (`after`): the donated buffer is updated in place.
  return o, LatentLayer(write(layer.c_kv, after(c_new, o_lat), positions, 1),
                        write(layer.k_rope, after(k_rope_new, o_lat), positions, 1))


def _absorbed_kernel(q_lat, q_rope, c_new, k_rope_new, positions, layer: LatentLayer,
                     weights: HeadsMajor, scale: float) -> tuple[jax.Array, LatentLayer]:
  """`absorbed` through the Pallas kernel (`kernels/mla_decode.py`): the new tokens' entries are
  written first, and the kernel reads them with the cache under FlashMLA's length convention
  (lengths include the T new tokens; query t sees the first lengths - (T - 1 - t) slots)."""
  dt = q_lat.dtype
  c_kv = write(layer.c_kv, c_new, positions, 1)
  k_rope = write(layer.k_rope, k_rope_new, positions, 1)
  lengths = positions[:, 0] + positions.shape[1]
  o_lat, _ = mla_decode.mla_decode(q_lat, q_rope.astype(dt), c_kv.astype(dt), k_rope.astype(dt),
                                   lengths, scale)
  o = jnp.einsum('BTNC,NCU->BTNU', o_lat, weights.w_uv.astype(dt))
  return o, LatentLayer(c_kv, k_rope)


def naive(q: jax.Array, k_new: jax.Array, v_new: jax.Array, positions: jax.Array,
          layer: NaiveLayer, scale: float) -> tuple[jax.Array, NaiveLayer]:
  """New tokens' q, k_new [B, T, N, A] and v_new [B, T, N, U] against the materialized cache
  -> (o [B, T, N, U], updated layer)."""
  dt = q.dtype
  k, v = layer.k.astype(dt), layer.v.astype(dt)  # [B, N, S, A], [B, N, S, U]
  # T-minor scores: a GEMV per head over the [S, A] cache rows (6x faster than T-major on XLA:CPU
  # at S = 8192; the fastest layout we found for the naive cache, so the comparison is fair).
  cached_scores = jnp.einsum('BTNA,BNSA->BNST', q, k)
  new_scores = jnp.einsum('BTNA,BJNA->BNTJ', q, k_new)
  cached_probs, new_probs = joint_softmax(jnp.swapaxes(cached_scores, 2, 3), new_scores,
                                          positions, scale)
  o = (jnp.einsum('BNST,BNSU->BTNU', jnp.swapaxes(cached_probs, 2, 3).astype(dt), v)
       + jnp.einsum('BNTJ,BJNU->BTNU', new_probs.astype(dt), v_new))
  return o, NaiveLayer(write(layer.k, after(k_new, o), positions, 2),
                       write(layer.v, after(v_new, o), positions, 2))

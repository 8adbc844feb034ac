"""The attention cores of MLA, as pure functions of arrays (`layers/mla.py` owns the weights).

- `attend`: training / prefill without a cache, softmax(q.k * scale) v over per-head keys, with
  its backward pass written out.
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
  (`kernels/mla_decode.py`), or 'auto' (the kernel where `mla_decode.use_kernel` says it fits)."""
  dt = q_nope.dtype
  c_kv, k_rope = layer.c_kv.astype(dt), layer.k_rope.astype(dt)  # [B, S, C], [B, S, R]
  B, T, N, _ = q_nope.shape
  S = c_kv.shape[1]
  q_lat = jnp.einsum('BTNH,NCH->BTNC', q_nope, weights.w_uk.astype(dt))
  if mla_decode.use_kernel(kernel, T, c_kv.shape[-1], k_rope.shape[-1]):
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

"""MLA over a KV cache: the absorbed form on the latent cache, and the naive form on a
materialized per-head cache (DESIGN.md, "What MLA caches"; DeepSeek-V2 §2.1.2, "absorb").

Absorbed, for T new tokens at positions p and S cache slots:

    q_lat  = q_nope W_UK^T                       [B, T, N, C]   W_UK folded into the query
    scores = q_lat . c_KV + q_rope . k_rope      [B, N, T, S]   against the cache as it is
    o_lat  = softmax(scores) c_KV                [B, T, N, C]   the output stays latent
    out    = (o_lat W_UV) W_O                    [B, T, D]

since q_nope . k_nope = q_nope . (c_KV W_UK) = (q_nope W_UK^T) . c_KV, and likewise for the
values. No per-head key or value of a cached token is ever formed: the work per cached token is
N (C + R) + N C multiply-adds reading C + R numbers, against N (H + R) + N U reading N (H + R + U).

The T new tokens attend to the cache as it was (slots s < lengths[b], earlier tokens) and to
each other (causally) under one softmax; their own entries are written into the cache after it
has been read, so a donated cache is updated in place. Both functions take the model's `MLA`
module as it is: `project_query` and `compress_kv` give the new tokens' query and latent, the
weights are read as arrays. Letters beyond DESIGN.md's: Y the new tokens as keys (Y = T),
Z = T x N, J = H + R.

`ModelConfig.mla_decode_kernel` picks how the absorbed scores and output are computed: 'xla'
(the einsums below), 'pallas' (`kernels/mla_decode.py`, which reads the cache after the new
entries are written, FlashMLA's convention), or 'auto' (the kernel on a GPU for T <= 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.inference.cache import LatentLayer, NaiveLayer
from kernels import mla_decode
from deepseek_jax.layers import rope
from deepseek_jax.layers.mla import MLA, masked_softmax


def write(buffer: jax.Array, new: jax.Array, positions: jax.Array, slot_axis: int) -> jax.Array:
  """buffer with sequence b's new[b] stored at slots positions[b, 0] .. positions[b, 0] + T - 1
  of `slot_axis` (1: buffer [B, S, ...], new [B, T, ...]; 2: buffer [B, N, S, X], new [B, T, N, X]).

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
  slots (slot s holds a valid earlier token iff s < lengths[b]) and [B, 1, T, Y] over the new
  tokens themselves (causal: t sees y <= t). Y is the new tokens as keys (Y = T)."""
  lengths = positions[:, :1]  # [B, 1]
  slots = jnp.arange(num_slots, dtype=jnp.int32)
  cached = jnp.broadcast_to((slots[None, :] < lengths)[:, None, None, :],
                            (positions.shape[0], 1, positions.shape[1], num_slots))
  T = positions.shape[1]
  causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]  # [T, Y]
  return cached, jnp.broadcast_to(causal[None, None], (positions.shape[0], 1, T, T))


def joint_softmax(cached_scores: jax.Array, new_scores: jax.Array, positions: jax.Array,
                  scale: float) -> tuple[jax.Array, jax.Array]:
  """Softmax over the cache slots and the new tokens together: scores [B, N, T, S] and
  [B, N, T, Y] -> probabilities of the same shapes (float32)."""
  S = cached_scores.shape[-1]
  cached_mask, new_mask = split_masks(positions, S)
  scores = jnp.concatenate([cached_scores, new_scores], axis=-1).astype(jnp.float32) * scale
  probs = masked_softmax(scores, jnp.concatenate([cached_mask, new_mask], axis=-1))
  return probs[..., :S], probs[..., S:]


class HeadsMajor(NamedTuple):
  """W_UK and W_UV with the heads first, the layout of the batched-over-N absorbed products.

  Made once per decode loop (`heads_major`, outside the loop body): XLA:CPU would otherwise
  transpose both weights on every step, which cost more than the attention itself at S = 512."""
  w_uk: jax.Array  # [N, C, H]
  w_uv: jax.Array  # [N, C, U]


def heads_major(attn: MLA, dtype) -> HeadsMajor:
  return HeadsMajor(jnp.transpose(attn.w_uk[...].astype(dtype), (1, 0, 2)),
                    jnp.transpose(attn.w_uv[...].astype(dtype), (1, 0, 2)))


def absorbed(attn: MLA, x: jax.Array, positions: jax.Array, layer: LatentLayer,
             weights: HeadsMajor | None = None) -> tuple[jax.Array, LatentLayer]:
  """x [B, T, D] (normed) at positions [B, T] -> (attention output [B, T, D], updated layer)."""
  dt = x.dtype
  w_uk, w_uv = weights if weights is not None else heads_major(attn, dt)
  q_nope, q_rope = attn.project_query(x, positions)  # [B, T, N, H], [B, T, N, R]
  c_new, k_rope_new = attn.compress_kv(x, positions)  # [B, T, C], [B, T, R]
  c_kv, k_rope = layer.c_kv.astype(dt), layer.k_rope.astype(dt)  # [B, S, C], [B, S, R]
  B, T, N, _ = q_nope.shape
  S = c_kv.shape[1]
  q_lat = jnp.einsum('BTNH,NCH->BTNC', q_nope, w_uk.astype(dt))
  if mla_decode.use_kernel(attn.cfg.mla_decode_kernel, T, c_kv.shape[-1], k_rope.shape[-1]):
    return _absorbed_kernel(attn, q_lat, q_rope, c_new, k_rope_new, positions, layer, w_uv)
  # The products over the cache are two plain GEMMs per sequence, with the new tokens' heads as
  # one dimension Z = T x N and the scores S-major (on XLA:CPU about 2x faster than the same
  # einsums with T and N apart, or with S minor, at S = 8192); the softmax sees them transposed.
  cached_scores = (jnp.einsum('BZC,BSC->BSZ', q_lat.reshape(B, T * N, -1), c_kv)
                   + jnp.einsum('BZR,BSR->BSZ', q_rope.reshape(B, T * N, -1), k_rope))
  new_scores = (jnp.einsum('BTNC,BYC->BNTY', q_lat, c_new)
                + jnp.einsum('BTNR,BYR->BNTY', q_rope, k_rope_new))
  cached_scores = jnp.transpose(cached_scores.reshape(B, S, T, N), (0, 3, 2, 1))  # [B, N, T, S]
  cached_probs, new_probs = joint_softmax(cached_scores, new_scores, positions,
                                          rope.softmax_scale(attn.cfg))
  cached_probs = jnp.transpose(cached_probs, (0, 3, 2, 1)).reshape(B, S, T * N).astype(dt)
  o_lat = (jnp.einsum('BSZ,BSC->BZC', cached_probs, c_kv).reshape(B, T, N, -1)
           + jnp.einsum('BNTY,BYC->BTNC', new_probs.astype(dt), c_new))  # [B, T, N, C]
  o = jnp.einsum('BTNC,NCU->BTNU', o_lat, w_uv.astype(dt))
  out = jnp.einsum('BTNU,NUD->BTD', o, attn.w_o[...].astype(dt))
  # Written after the cache was read (`after`): the donated buffer is updated in place.
  return out, LatentLayer(write(layer.c_kv, after(c_new, o_lat), positions, 1),
                          write(layer.k_rope, after(k_rope_new, o_lat), positions, 1))


def _absorbed_kernel(attn: MLA, q_lat, q_rope, c_new, k_rope_new, positions, layer: LatentLayer,
                     w_uv) -> tuple[jax.Array, LatentLayer]:
  """`absorbed` through the Pallas kernel (`kernels/mla_decode.py`): the new tokens' entries are
  written first, and the kernel reads them with the cache under FlashMLA's length convention
  (lengths include the T new tokens; query t sees the first lengths - (T - 1 - t) slots)."""
  dt = q_lat.dtype
  c_kv = write(layer.c_kv, c_new, positions, 1)
  k_rope = write(layer.k_rope, k_rope_new, positions, 1)
  lengths = positions[:, 0] + positions.shape[1]
  o_lat, _ = mla_decode.mla_decode(q_lat, q_rope.astype(dt), c_kv.astype(dt), k_rope.astype(dt),
                                   lengths, rope.softmax_scale(attn.cfg))
  o = jnp.einsum('BTNC,NCU->BTNU', o_lat, w_uv.astype(dt))
  out = jnp.einsum('BTNU,NUD->BTD', o, attn.w_o[...].astype(dt))
  return out, LatentLayer(c_kv, k_rope)


def naive(attn: MLA, x: jax.Array, positions: jax.Array,
          layer: NaiveLayer) -> tuple[jax.Array, NaiveLayer]:
  """The same attention with per-head keys and values materialized and cached."""
  dt = x.dtype
  N = attn.cfg.num_heads
  q_nope, q_rope = attn.project_query(x, positions)
  c_new, k_rope_new = attn.compress_kv(x, positions)
  k_nope = jnp.einsum('BTC,CNH->BTNH', c_new, attn.w_uk[...].astype(dt))
  k_rope_heads = jnp.broadcast_to(k_rope_new[:, :, None, :], k_rope_new.shape[:2] + (N,)
                                  + k_rope_new.shape[2:])
  k_new = jnp.concatenate([k_nope, k_rope_heads], axis=-1)  # [B, T, N, J], J = H + R
  v_new = jnp.einsum('BTC,CNU->BTNU', c_new, attn.w_uv[...].astype(dt))
  k, v = layer.k.astype(dt), layer.v.astype(dt)  # [B, N, S, J], [B, N, S, U]
  q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, N, J]
  # T-minor scores: a GEMV per head over the [S, J] cache rows (6x faster than T-major on XLA:CPU
  # at S = 8192; the fastest layout we found for the naive cache, so the comparison is fair).
  cached_scores = jnp.einsum('BTNJ,BNSJ->BNST', q, k)
  new_scores = jnp.einsum('BTNJ,BYNJ->BNTY', q, k_new)
  cached_probs, new_probs = joint_softmax(jnp.swapaxes(cached_scores, 2, 3), new_scores,
                                          positions, rope.softmax_scale(attn.cfg))
  o = (jnp.einsum('BNST,BNSU->BTNU', jnp.swapaxes(cached_probs, 2, 3).astype(dt), v)
       + jnp.einsum('BNTY,BYNU->BTNU', new_probs.astype(dt), v_new))
  out = jnp.einsum('BTNU,NUD->BTD', o, attn.w_o[...].astype(dt))
  return out, NaiveLayer(write(layer.k, after(k_new, o), positions, 2),
                         write(layer.v, after(v_new, o), positions, 2))


def cached(attn: MLA, x: jax.Array, positions: jax.Array, layer: LatentLayer | NaiveLayer,
           weights: HeadsMajor | None = None) -> tuple[jax.Array, LatentLayer | NaiveLayer]:
  """The absorbed path on a latent layer, the naive path on a materialized one."""
  if isinstance(layer, LatentLayer):
    return absorbed(attn, x, positions, layer, weights)
  return naive(attn, x, positions, layer)

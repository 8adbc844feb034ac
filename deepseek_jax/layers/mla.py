"""Multi-head Latent Attention, training / prefill ("naive") path (DeepSeek-V2 §2.1, V3 §2.1.1).

    c_Q   = RMSNorm(x W_DQ)                      [B, T, Q]   (q_lora_rank=None: q = x W_Q)
    q     = c_Q W_UQ, q_rope = RoPE(c_Q W_QR)    [B, T, N, H], [B, T, N, R]
    c_KV  = RMSNorm(x W_DKV)                     [B, S, C]   <- what decoding caches
    k_rope = RoPE(x W_KR)                        [B, S, R]   <- one rope key shared by all heads
    k = c_KV W_UK, v = c_KV W_UV                 [B, S, N, H], [B, S, N, U]
    o = softmax((q.k + q_rope.k_rope) * scale) v, out = o W_O

U is the value head dim. The pure function `attention` takes the weights as arrays so that the
inference issue's absorbed path can reuse `project_query` and `compress_kv` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import linear, param, rope
from deepseek_jax.layers.norm import RMSNorm

QUERY_NORM_EPS = 1e-6  # q/kv latent norms use the RMSNorm default in HF and DeepSeek's reference


class MLA(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, H, R, U, C = (cfg.hidden_size, cfg.num_heads, cfg.qk_nope_head_dim,
                        cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
    std = cfg.init_std
    self.cfg = cfg
    if cfg.q_lora_rank is None:
      self.w_q = param.normal(rngs, (D, N, H), ('embed', 'heads', 'head_dim'), std)
      self.w_qr = param.normal(rngs, (D, N, R), ('embed', 'heads', 'rope'), std)
    else:
      Q = cfg.q_lora_rank
      self.w_dq = param.normal(rngs, (D, Q), ('embed', 'q_latent'), std)
      self.q_norm = RMSNorm(Q, QUERY_NORM_EPS)
      self.w_uq = param.normal(rngs, (Q, N, H), ('q_latent', 'heads', 'head_dim'), std)
      self.w_qr = param.normal(rngs, (Q, N, R), ('q_latent', 'heads', 'rope'), std)
    self.w_dkv = param.normal(rngs, (D, C), ('embed', 'kv_latent'), std)
    self.w_kr = param.normal(rngs, (D, R), ('embed', 'rope'), std)
    self.kv_norm = RMSNorm(C, QUERY_NORM_EPS)
    self.w_uk = param.normal(rngs, (C, N, H), ('kv_latent', 'heads', 'head_dim'), std)
    self.w_uv = param.normal(rngs, (C, N, U), ('kv_latent', 'heads', 'head_dim'), std)
    self.w_o = param.normal(rngs, (N, U, D), ('heads', 'head_dim', 'embed'), std)

  def project_query(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> q_nope [B, T, N, H], q_rope [B, T, N, R] (rotated)."""
    if self.cfg.q_lora_rank is None:
      source, w_nope, w_rope = x, self.w_q, self.w_qr
    else:
      source = self.q_norm(_linear(x, self.w_dq[...], self.cfg))
      w_nope, w_rope = self.w_uq, self.w_qr
    q_nope = _heads_linear(source, w_nope[...], self.cfg)
    q_rope = _heads_linear(source, w_rope[...], self.cfg)
    return q_nope, rope.apply_rope(q_rope, positions, self.cfg)

  def compress_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, S, D] -> c_KV [B, S, C] (normed) and k_rope [B, S, R] (rotated): the latent cache."""
    c_kv = self.kv_norm(_linear(x, self.w_dkv[...], self.cfg))
    k_rope = _linear(x, self.w_kr[...], self.cfg)
    return c_kv, rope.apply_rope(k_rope, positions, self.cfg)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal self-attention over x [B, T, D]; `segment_ids` [B, T] keep packed documents apart."""
    N = self.cfg.num_heads
    q_nope, q_rope = self.project_query(x, positions)
    c_kv, k_rope = self.compress_kv(x, positions)
    # One dot per score: [q_nope; q_rope].[k_nope; k_rope], the rope key repeated for every head.
    q = jnp.concatenate([q_nope, q_rope], axis=-1).transpose(0, 2, 1, 3)  # [B, N, T, H+R]
    k_nope = _heads_linear(c_kv, self.w_uk[...], self.cfg).transpose(0, 2, 1, 3)  # [B, N, S, H]
    k_rope = jnp.broadcast_to(k_rope[:, None], (k_rope.shape[0], N) + k_rope.shape[1:])
    k = jnp.concatenate([k_nope, k_rope], axis=-1)                       # [B, N, S, H+R]
    v = _heads_linear(c_kv, self.w_uv[...], self.cfg).transpose(0, 2, 1, 3)       # [B, N, S, U]
    o = attend(q, k, v, causal_mask(positions, segment_ids), rope.softmax_scale(self.cfg))
    B, _, T, U = o.shape
    o = o.transpose(0, 2, 1, 3).reshape(B, T, N * U)
    return _linear(o, self.w_o[...].reshape(N * U, -1), self.cfg)


def _linear(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in the config's precision (and FP8 kernel)."""
  return linear.linear(x, w, precision=cfg.precision, fp8_kernel=cfg.fp8_matmul_kernel)


def _heads_linear(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x [B, T, Q] with w [Q, N, H] -> [B, T, N, H] (the einsum 'BTQ,QNH->BTNH' as one matmul)."""
  Q, N, H = w.shape
  out = _linear(x, w.reshape(Q, N * H), cfg)
  return out.reshape(x.shape[:-1] + (N, H))


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

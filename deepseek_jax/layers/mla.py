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

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import param, rope
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
    dt = x.dtype
    if self.cfg.q_lora_rank is None:
      source, w_nope, w_rope = x, self.w_q, self.w_qr
    else:
      source = self.q_norm(jnp.einsum('BTD,DQ->BTQ', x, self.w_dq[...].astype(dt)))
      w_nope, w_rope = self.w_uq, self.w_qr
    q_nope = jnp.einsum('BTQ,QNH->BTNH', source, w_nope[...].astype(dt))
    q_rope = jnp.einsum('BTQ,QNR->BTNR', source, w_rope[...].astype(dt))
    return q_nope, rope.apply_rope(q_rope, positions, self.cfg)

  def compress_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, S, D] -> c_KV [B, S, C] (normed) and k_rope [B, S, R] (rotated): the latent cache."""
    dt = x.dtype
    c_kv = self.kv_norm(jnp.einsum('BSD,DC->BSC', x, self.w_dkv[...].astype(dt)))
    k_rope = jnp.einsum('BSD,DR->BSR', x, self.w_kr[...].astype(dt))
    return c_kv, rope.apply_rope(k_rope, positions, self.cfg)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal self-attention over x [B, T, D]; `segment_ids` [B, T] keep packed documents apart."""
    dt = x.dtype
    q_nope, q_rope = self.project_query(x, positions)
    c_kv, k_rope = self.compress_kv(x, positions)
    k_nope = jnp.einsum('BSC,CNH->BSNH', c_kv, self.w_uk[...].astype(dt))
    v = jnp.einsum('BSC,CNU->BSNU', c_kv, self.w_uv[...].astype(dt))
    scores = (jnp.einsum('BTNH,BSNH->BNTS', q_nope, k_nope)
              + jnp.einsum('BTNR,BSR->BNTS', q_rope, k_rope))
    mask = causal_mask(positions, segment_ids)  # [B, 1, T, S]
    probs = masked_softmax(scores.astype(jnp.float32) * rope.softmax_scale(self.cfg), mask)
    o = jnp.einsum('BNTS,BSNU->BTNU', probs.astype(dt), v)
    return jnp.einsum('BTNU,NUD->BTD', o, self.w_o[...].astype(dt))


def causal_mask(positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """[B, 1, T, S] boolean: query t sees key s iff pos(s) <= pos(t) (and the same segment)."""
  mask = positions[:, None, :, None] >= positions[:, None, None, :]
  if segment_ids is not None:
    mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return mask


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis in float32; fully masked rows give zeros, not NaN."""
  scores = jnp.where(mask, scores, -jnp.inf)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
  return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)

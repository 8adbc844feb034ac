"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1): one module for training, prefill,
decoding and speculative verification.

    c_Q   = RMSNorm(x W_DQ)                      [B, T, Q]   (q_lora_rank=None: q = x W_Q)
    q     = c_Q W_UQ, q_rope = RoPE(c_Q W_QR)    [B, T, N, H], [B, T, N, R]
    c_KV  = RMSNorm(x W_DKV)                     [B, S, C]   <- what decoding caches
    k_rope = RoPE(x W_KR)                        [B, S, R]   <- one rope key shared by all heads
    k = c_KV W_UK, v = c_KV W_UV                 [B, S, N, H], [B, S, N, U]
    o = softmax((q.k + q_rope.k_rope) * scale) v, out = o W_O

U is the value head dim. `MLA(x, positions, segment_ids, cache=None)` returns (out, cache) and
picks its attention core (`layers/attention.py`) by the cache it is given: none -> the training
path (`self_attend`: per-head keys formed from c_KV, dense or blockwise by `model.attention`); a
`LatentLayer` -> the absorbed form over the latent cache; a `NaiveLayer` -> the same per-head
keys as training, against a materialized cache. Every projection goes through the same `linear`
(and so the same precision switch) in all three; under precision='fp8' the absorbed form multiplies the FP8-rounded W_UK, W_UV and c_KV
(`fp8.quant.round_trip`), which is what the uncached path's FP8 GEMMs multiply, so the paths
agree up to accumulation order. Under `fp8_weights` each projection's weight is kept in E4M3
with its scales (`fp8.QuantizedWeight`, `<name>_scale`), and the absorbed form multiplies the
kept W_UK, W_UV times their scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax import fp8
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import attention, linear, param, rope
from deepseek_jax.layers.kv_cache import HeadsMajor, LatentLayer, LayerCache, NaiveLayer
from deepseek_jax.layers.norm import RMSNorm

# The q and kv latent norms use the RMSNorm default of HF and DeepSeek's reference, not the
# config's rms_norm_eps (equal for V3; they differ in configs that change rms_norm_eps).
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, H, R, U, C = (cfg.hidden_size, cfg.num_heads, cfg.qk_nope_head_dim,
                        cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
    std = cfg.init_std
    self.cfg = cfg

    def weight(name, shape, axes, in_dims=1):  # a weight, and its scales when kept in E4M3
      w, scale = param.linear_weight(rngs, shape, axes, std, cfg.fp8_weights, in_dims=in_dims)
      setattr(self, name, w)
      setattr(self, name + '_scale', scale)

    if cfg.q_lora_rank is None:
      weight('w_q', (D, N, H), ('embed', 'heads', 'head_dim'))
      weight('w_qr', (D, N, R), ('embed', 'heads', 'rope'))
    else:
      Q = cfg.q_lora_rank
      weight('w_dq', (D, Q), ('embed', 'q_latent'))
      self.q_norm = RMSNorm(Q, LATENT_NORM_EPS)
      weight('w_uq', (Q, N, H), ('q_latent', 'heads', 'head_dim'))
      weight('w_qr', (Q, N, R), ('q_latent', 'heads', 'rope'))
    weight('w_dkv', (D, C), ('embed', 'kv_latent'))
    weight('w_kr', (D, R), ('embed', 'rope'))
    self.kv_norm = RMSNorm(C, LATENT_NORM_EPS)
    weight('w_uk', (C, N, H), ('kv_latent', 'heads', 'head_dim'))
    weight('w_uv', (C, N, U), ('kv_latent', 'heads', 'head_dim'))
    weight('w_o', (N, U, D), ('heads', 'head_dim', 'embed'), in_dims=2)

  def _weight(self, name: str):
    """The array `linear` multiplies, or the kept E4M3 weight with its scales."""
    return param.weight(getattr(self, name), getattr(self, name + '_scale'))

  def project_query(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> q_nope [B, T, N, H], q_rope [B, T, N, R] (rotated)."""
    if self.cfg.q_lora_rank is None:
      source, w_nope, w_rope = x, self._weight('w_q'), self._weight('w_qr')
    else:
      source = self.q_norm(_linear(x, self._weight('w_dq'), self.cfg))
      w_nope, w_rope = self._weight('w_uq'), self._weight('w_qr')
    q_nope = _heads_linear(source, w_nope, self.cfg)
    q_rope = _heads_linear(source, w_rope, self.cfg)
    return q_nope, rope.apply_rope(q_rope, positions, self.cfg)

  def compress_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, S, D] -> c_KV [B, S, C] (normed) and k_rope [B, S, R] (rotated): the latent cache."""
    c_kv = self.kv_norm(_linear(x, self._weight('w_dkv'), self.cfg))
    k_rope = _linear(x, self._weight('w_kr'), self.cfg)
    return c_kv, rope.apply_rope(k_rope, positions, self.cfg)

  def heads_major(self, dtype) -> HeadsMajor:
    """W_UK [N, C, H] and W_UV [N, C, U] for the absorbed products, as the uncached path's GEMMs
    see them (FP8-rounded under precision='fp8', the kept values x scales under fp8_weights); a
    decode loop makes them once."""
    def prepare(w):  # [C, N, H or U] -> [N, C, H or U]
      C, N, width = w.shape
      if isinstance(w, fp8.QuantizedWeight):  # exactly what the FP8 GEMM multiplies
        w = w.reshape(C, N * width).dequantize().reshape(C, N, width)
      elif self.cfg.precision == 'fp8':  # as `linear` quantizes it: a [C, N·width] float32 matrix
        w = fp8.quant.round_trip(w.reshape(C, N * width).astype(jnp.float32),
                                 fp8.WEIGHT_BLOCK).reshape(C, N, width)
      return jnp.transpose(w.astype(dtype), (1, 0, 2))
    return HeadsMajor(prepare(self._weight('w_uk')), prepare(self._weight('w_uv')))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """Causal self-attention of x [B, T, D] at positions [B, T] -> (out [B, T, D], cache).

    Without a cache, `segment_ids` [B, T] keep packed documents apart. With one, the T tokens
    sit at positions lengths[b] + t and attend to the cached slots and to each other."""
    B, T, _ = x.shape
    N, U = self.cfg.num_heads, self.cfg.v_head_dim
    scale = rope.softmax_scale(self.cfg)
    # Names for the remat policies (layers/remat.py: 'save_attention' keeps these three).
    q_nope, q_rope = checkpoint_name(self.project_query(x, positions), 'q')  # [B,T,N,H], [B,T,N,R]
    c_kv, k_rope = checkpoint_name(self.compress_kv(x, positions), 'kv_latent')  # [B,T,C], [B,T,R]
    if isinstance(cache, LatentLayer):
      if self.cfg.precision == 'fp8':
        c_kv = fp8.quant.round_trip(c_kv, fp8.ACT_BLOCK)  # as the W_UK / W_UV GEMMs quantize it
      weights = cache.weights if cache.weights is not None else self.heads_major(x.dtype)
      o, cache = attention.absorbed(q_nope, q_rope, c_kv, k_rope, positions, cache, weights,
                                    scale, self.cfg.mla_decode_kernel)
    else:
      # Per-head keys [q_nope; q_rope].[k_nope; k_rope], the rope key repeated for every head.
      k_nope = _heads_linear(c_kv, self._weight('w_uk'), self.cfg)             # [B, T, N, H]
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3]
                                                    + k_rope.shape[-1:])], axis=-1)
      q = jnp.concatenate([q_nope, q_rope], axis=-1)                           # [B, T, N, H+R]
      v = _heads_linear(c_kv, self._weight('w_uv'), self.cfg)                  # [B, T, N, U]
      if cache is None:
        heads_first = lambda a: a.transpose(0, 2, 1, 3)
        o = heads_first(attention.self_attend(heads_first(q), heads_first(k), heads_first(v),
                                              positions, segment_ids, scale, self.cfg.attention))
      else:
        o, cache = attention.naive(q, k, v, positions, cache, scale)
    w_o = self._weight('w_o').reshape(N * U, -1)  # [N U, D]
    out = checkpoint_name(_linear(o.reshape(B, T, N * U), w_o, self.cfg), 'attn_out')
    return out, cache


def _linear(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x [..., I] @ w [I, O] -> [..., O] in the config's precision (and FP8 kernel)."""
  return linear.linear(x, w, precision=cfg.precision, fp8_kernel=cfg.fp8_matmul_kernel)


def _heads_linear(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x [B, T, I] with w [I, N, H] -> [B, T, N, H] (the einsum 'BTI,INH->BTNH' as one matmul; I is
  Q, D or C, H may be U or R)."""
  I, N, H = w.shape
  out = _linear(x, w.reshape(I, N * H), cfg)
  return out.reshape(x.shape[:-1] + (N, H))

"""One pre-norm decoder block: x + MLA(norm(x)), then + FFN(norm(.)), FFN dense or MoE; with an
optional KV cache for the attention (the same block trains, prefills and decodes)."""

from __future__ import annotations

import jax
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.ffn import SwiGLU
from deepseek_jax.layers.kv_cache import LayerCache
from deepseek_jax.layers.mla import MLA
from deepseek_jax.layers.moe import MoE, MoEStats
from deepseek_jax.layers.norm import RMSNorm


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
  """Layers from `first_k_dense` on (MTP blocks count as layers num_layers, num_layers+1, ...)."""
  return layer_idx >= cfg.first_k_dense


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = MLA(cfg, rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if is_moe_layer(cfg, layer_idx):
      self.ffn = MoE(cfg, rngs)
    else:
      self.ffn = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.init_std, rngs,
                        cfg.precision, cfg.fp8_matmul_kernel)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: LayerCache | None = None
               ) -> tuple[jax.Array, MoEStats | None, LayerCache | None]:
    """x [B, T, D] -> (x [B, T, D], the MoE layer's statistics or None, the updated cache)."""
    out, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    x = x + out
    if isinstance(self.ffn, MoE):
      out, stats = self.ffn(self.ffn_norm(x))
      return x + out, stats, cache
    return x + self.ffn(self.ffn_norm(x)), None, cache

"""One pre-norm decoder block: x + MLA(norm(x)), then + FFN(norm(.)), FFN dense or MoE; with an
optional KV cache for the attention (the same block trains, prefills and decodes). Without a
cache the block is rematerialized by `cfg.remat` (`layers/remat.py`)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import remat
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
    self.remat_name = cfg.remat
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = MLA(cfg, rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if is_moe_layer(cfg, layer_idx):
      self.ffn = MoE(cfg, rngs)
    else:
      self.ffn = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.init_std, rngs,
                        cfg.precision, cfg.fp8_matmul_kernel, cfg.fp8_weights)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: LayerCache | None = None
               ) -> tuple[jax.Array, MoEStats | None, LayerCache | None]:
    """x [B, T, D] -> (x [B, T, D], the MoE layer's statistics or None, the updated cache)."""
    if cache is not None or self.remat_name == 'none':  # decoding has no backward pass
      return self._forward(x, positions, segment_ids, cache)
    graphdef, state = nnx.split(self)

    def forward(state, x, positions, segment_ids):  # a pure function, for jax.checkpoint
      x = checkpoint_name(x, remat.BLOCK_INPUT)  # every use reads the named copy (offload_inputs)
      x, stats, _ = nnx.merge(graphdef, state)._forward(x, positions, segment_ids)
      return x, stats

    x, stats = jax.checkpoint(forward, policy=remat.policy(self.remat_name))(
        state, x, positions, segment_ids)
    return x, stats, None

  def _forward(self, x, positions, segment_ids=None, cache=None):
    out, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    x = x + out
    if isinstance(self.ffn, MoE):
      out, stats = self.ffn(self.ffn_norm(x))
      return x + out, stats, cache
    return x + self.ffn(self.ffn_norm(x)), None, cache

"""Multi-Token Prediction module (V3 §2.2, eq. 21).

Module k combines the previous depth's representation h^{k-1}_i with the embedding of token
t_{i+k}:  h'_k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],  then one decoder block.
The shared output head (final RMSNorm of this module, then the main model's head) predicts token
t_{i+k+1}. The concatenation order, embedding first, is the released checkpoint's (`eh_proj`),
as in DeepSeek's reference and HF; the paper's eq. 21 writes it the other way round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import linear, param
from deepseek_jax.layers.block import Block
from deepseek_jax.layers.kv_cache import LayerCache
from deepseek_jax.layers.moe import MoEStats
from deepseek_jax.layers.norm import RMSNorm


class MTPModule(nnx.Module):

  def __init__(self, cfg: ModelConfig, depth: int, rngs: nnx.Rngs):
    D = cfg.hidden_size
    self.enorm = RMSNorm(D, cfg.rms_norm_eps)
    self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
    self.eh_proj = param.normal(rngs, (2 * D, D), ('mtp_in', 'embed'), cfg.init_std)  # M_k
    self.block = Block(cfg, cfg.num_layers + depth - 1, rngs)
    self.norm = RMSNorm(D, cfg.rms_norm_eps)  # the output head's norm for this depth

  def __call__(self, h_prev: jax.Array, next_embeddings: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None, cache: LayerCache | None = None
               ) -> tuple[jax.Array, jax.Array, MoEStats | None, LayerCache | None]:
    """h_prev [B, T, D] (h^{k-1}, before any output norm), next_embeddings [B, T, D] = Emb(t_{i+k}).

    Returns (h^k [B, T, D], normed h^k for the shared head, MoE statistics or None, the block's
    updated cache: when drafting, the module's attention layer has a one-layer cache of its own)."""
    joined = jnp.concatenate([self.enorm(next_embeddings), self.hnorm(h_prev)], axis=-1)
    h = linear.linear(joined, self.eh_proj[...])  # kept out of FP8, as it has always been here
    h, stats, cache = self.block(h, positions, segment_ids, cache)
    return h, self.norm(h), stats, cache

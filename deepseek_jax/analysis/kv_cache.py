"""KV cache bytes per token (all layers) for MLA, GQA, MQA and MHA.

MLA caches one latent c_KV [C] and one shared rope key [R] per token per layer (V3 report §2.1.1,
eqs. 1 and 3), whatever the number of heads. GQA / MQA / MHA cache a key and a value per KV head
(the G groups of GQA, 1 for MQA, N for MHA). KB in the ISCA'25 paper's Table 1 is 1000 bytes.
"""

from __future__ import annotations

from deepseek_jax.analysis.dense_models import DenseModel
from deepseek_jax.config import ModelConfig

BF16_BYTES = 2
FP8_BYTES = 1
FP32_BYTES = 4
FP8_SCALE_TILE = 128  # FlashMLA's FP8 cache: one FP32 scale per 128 latent values


def mla_values_per_layer(cfg: ModelConfig) -> int:
  return cfg.kv_cache_values_per_token  # C + R = 576 for V2 and V3


def mla_bytes(cfg: ModelConfig, bytes_per_value: int = BF16_BYTES) -> int:
  """The latent cache in one dtype: (C + R) values per layer."""
  return mla_values_per_layer(cfg) * bytes_per_value * cfg.num_layers


def mla_fp8_bytes_per_layer(cfg: ModelConfig) -> int:
  """FlashMLA's FP8 layout: C E4M3 values, C/128 FP32 scales, R BF16 rope values (656 for V3)."""
  scales = -(-cfg.kv_lora_rank // FP8_SCALE_TILE)
  return (cfg.kv_lora_rank * FP8_BYTES + scales * FP32_BYTES
          + cfg.qk_rope_head_dim * BF16_BYTES)


def mla_fp8_bytes(cfg: ModelConfig) -> int:
  return mla_fp8_bytes_per_layer(cfg) * cfg.num_layers


def kv_heads_bytes(num_layers: int, kv_heads: int, k_head_dim: int, v_head_dim: int,
                   bytes_per_value: int = BF16_BYTES) -> int:
  """A materialized cache: one key [k_head_dim] and one value [v_head_dim] per KV head."""
  return num_layers * kv_heads * (k_head_dim + v_head_dim) * bytes_per_value


def dense_bytes(model: DenseModel, kv_heads: int | None = None,
                bytes_per_value: int = BF16_BYTES) -> int:
  """GQA as released (kv_heads=None), or the same shapes as MHA (kv_heads=N) / MQA (1)."""
  heads = model.num_kv_heads if kv_heads is None else kv_heads
  return kv_heads_bytes(model.num_layers, heads, model.head_dim, model.head_dim, bytes_per_value)


def mla_as_kv_heads_bytes(cfg: ModelConfig, kv_heads: int | None = None,
                          bytes_per_value: int = BF16_BYTES) -> int:
  """MLA's own shapes materialized: keys [H + R] and values [U] per head (MHA with kv_heads=N,
  MQA with 1) — what caching k and v instead of c_KV would cost."""
  heads = cfg.num_heads if kv_heads is None else kv_heads
  return kv_heads_bytes(cfg.num_layers, heads, cfg.qk_head_dim, cfg.v_head_dim, bytes_per_value)

"""The dense GQA models the DeepSeek papers compare against, as plain data, and their parameters.

They are not models of this codebase, so there is no `jax.eval_shape` to read: their counts come
from the shapes of their released configs (LLaMA-style blocks: q/k/v/o projections with grouped
KV heads, a SwiGLU FFN, two RMSNorms per block, untied embedding and head).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DenseModel:
  name: str
  vocab_size: int          # V
  hidden_size: int         # D
  num_layers: int          # L
  num_heads: int           # N, query heads
  num_kv_heads: int        # heads of the K/V cache (GQA groups); N = MHA, 1 = MQA
  head_dim: int            # H, the same for q, k and v
  intermediate_size: int   # F of the SwiGLU FFN
  qkv_bias: bool = False   # Qwen adds biases to the q, k, v projections
  tied_embeddings: bool = False

  @property
  def layer_params(self) -> int:
    D, N, KV, H, F = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                      self.intermediate_size)
    attention = D * N * H + 2 * D * KV * H + N * H * D
    bias = (N * H + 2 * KV * H) if self.qkv_bias else 0
    return attention + bias + 3 * D * F + 2 * D  # SwiGLU has three D x F matrices

  @property
  def embedding_params(self) -> int:
    return self.vocab_size * self.hidden_size

  @property
  def total_params(self) -> int:
    head = 0 if self.tied_embeddings else self.embedding_params
    return self.num_layers * self.layer_params + self.hidden_size + self.embedding_params + head

  @property
  def matmul_params(self) -> int:
    """Parameters multiplied per token: all but the input embedding (a gather)."""
    return self.total_params - (0 if self.tied_embeddings else self.embedding_params)


# Qwen2.5-72B config.json: 80 layers, 64 query / 8 KV heads of 128, FFN 29568, q/k/v biases.
QWEN2_5_72B = DenseModel(name='Qwen-2.5-72B', vocab_size=152_064, hidden_size=8192,
                         num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                         intermediate_size=29_568, qkv_bias=True)

# Llama-3.1-405B config.json: 126 layers, 128 query / 8 KV heads of 128, FFN 53248.
LLAMA3_1_405B = DenseModel(name='LLaMA-3.1-405B', vocab_size=128_256, hidden_size=16_384,
                           num_layers=126, num_heads=128, num_kv_heads=8, head_dim=128,
                           intermediate_size=53_248)

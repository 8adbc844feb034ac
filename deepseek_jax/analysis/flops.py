"""Training compute per token (ISCA'25 "Insights into DeepSeek-V3", Table 2: sequence 4096).

One formula for every model, MoE or dense:

    FLOPs/token = 3 x forward                          (backward = input grads + weight grads
                                                         = 2 x forward)
    forward     = 2 P + 2 L N (d_qk + d_v) S/2
                  ^^^   ^^^^^^^^^^^^^^^^^^^^^^^^
                  |     attention core: q.k over d_qk and p.v over d_v, each a multiply-add
                  |     (2 FLOPs) per head per key; a causal token sees S/2 keys on average
                  matmul FLOPs of the activated parameters (one multiply-add per weight)

so FLOPs/token = 6 P + 3 L N (d_qk + d_v) S, with

  P     activated parameters that are multiplied per token: everything activated except the input
        embedding (a gather); the output head, the router and the shared experts are in, of the
        routed experts only K of E (`params.count(cfg).activated`). Norm weights (elementwise,
        ~1e-5 of P) are left in. The MTP module is not counted (Table 2 counts the main model).
  L, N  layers and query heads (GQA shares K/V heads but every query head attends).
  d_qk  the query-key head dim (H + R = 192 for MLA's training path, 128 for LLaMA / Qwen).
  d_v   the value head dim (U = 128).
  S     the sequence length (4096).
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.analysis import params
from deepseek_jax.analysis.dense_models import DenseModel
from deepseek_jax.config import ModelConfig

SEQ_LEN = 4096  # Table 2's sequence length


@dataclasses.dataclass(frozen=True)
class TrainFlops:
  matmul: float     # 6 P
  attention: float  # 3 L N (d_qk + d_v) S (causal) or twice that (non-causal)

  @property
  def total(self) -> float:
    return self.matmul + self.attention


def train_flops_per_token(matmul_params: int, num_layers: int, num_heads: int, qk_head_dim: int,
                          v_head_dim: int, seq_len: int = SEQ_LEN,
                          causal: bool = True) -> TrainFlops:
  """The formula above; `causal=False` counts the whole S x S score matrix (Megatron's MFU)."""
  keys_seen = seq_len / 2 if causal else seq_len
  forward_attention = 2 * num_layers * num_heads * (qk_head_dim + v_head_dim) * keys_seen
  return TrainFlops(matmul=3 * 2 * matmul_params, attention=3 * forward_attention)


def for_config(cfg: ModelConfig, seq_len: int = SEQ_LEN, causal: bool = True,
               with_mtp: bool = False) -> TrainFlops:
  """Our model: P from `jax.eval_shape` of the real model (`params.count`)."""
  counts = params.count(cfg)
  matmul_params = counts.activated - counts.embedding
  layers = cfg.num_layers
  if with_mtp:  # each MTP depth: its own block (+ eh_proj) and one more pass through the head
    head = counts.embedding  # the head is V x D like the embedding (untied, same shape)
    matmul_params += counts.mtp_activated + cfg.mtp_depth * head
    layers += cfg.mtp_depth
  return train_flops_per_token(matmul_params, layers, cfg.num_heads, cfg.qk_head_dim,
                               cfg.v_head_dim, seq_len, causal)


def for_dense(model: DenseModel, seq_len: int = SEQ_LEN, causal: bool = True) -> TrainFlops:
  return train_flops_per_token(model.matmul_params, model.num_layers, model.num_heads,
                               model.head_dim, model.head_dim, seq_len, causal)

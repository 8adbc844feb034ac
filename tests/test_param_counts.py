"""Parameter counts from jax.eval_shape of our model against HF transformers' models on the meta
device (no memory), for the full-size configs, and the papers' headline figures."""

import pytest
import torch
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3DecoderLayer,
                                                                    DeepseekV3RMSNorm)

from deepseek_jax.analysis import params
from deepseek_jax.config import ModelConfig
from experiments.configs import deepseek_v2_lite, deepseek_v3


def _hf_kwargs(cfg: ModelConfig) -> dict:
  """Our hyperparameters under HF's names, written out here as an independent map."""
  return dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_heads, n_shared_experts=cfg.n_shared_experts,
      n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
      first_k_dense_replace=cfg.first_k_dense, q_lora_rank=cfg.q_lora_rank,
      kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, n_group=cfg.n_group,
      topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
      norm_topk_prob=cfg.norm_topk_prob)


def _numel(module: torch.nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def _config(module) -> ModelConfig:
  return ModelConfig.from_dict(module.get_config().model.to_dict())


@pytest.mark.slow
def test_deepseek_v3_counts_equal_hf_on_meta_device():
  cfg = _config(deepseek_v3)
  hf_cfg = DeepseekV3Config(**_hf_kwargs(cfg))
  with torch.device('meta'):
    hf_total = _numel(DeepseekV3ForCausalLM(hf_cfg))
    # The MTP module: one MoE decoder block, eh_proj (2D -> D), enorm, hnorm, shared_head.norm.
    mtp_block = DeepseekV3DecoderLayer(hf_cfg, layer_idx=cfg.num_layers)
    norm = DeepseekV3RMSNorm(cfg.hidden_size)
  hf_mtp = _numel(mtp_block) + 2 * cfg.hidden_size ** 2 + 3 * _numel(norm)
  ours = params.count(cfg)
  assert ours.total == hf_total
  assert round(ours.total / 1e9, 1) == 671.0  # V3 report: 671B total
  assert 36.5e9 < ours.activated < 38e9       # 37B activated per token
  assert ours.mtp == hf_mtp
  assert 11.5e9 < ours.mtp < 11.7e9           # "11.5B extra unique parameters" (deepseek_jax/DESIGN.md)


def test_deepseek_v2_lite_counts_equal_hf_on_meta_device():
  cfg = _config(deepseek_v2_lite)
  kwargs = _hf_kwargs(cfg)
  kwargs.update(topk_method='greedy')
  with torch.device('meta'):
    hf_total = _numel(DeepseekV2ForCausalLM(DeepseekV2Config(**kwargs)))
  ours = params.count(cfg)
  assert ours.total == hf_total
  assert round(ours.total / 1e9, 1) == 15.7                       # V2 paper: 15.7B total
  assert 2.4e9 <= ours.activated - ours.embedding < 2.5e9  # "2.4B activated" (2.45B)
  assert ours.mtp == 0

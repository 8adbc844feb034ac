"""DeepSeek-V2-Lite (15.7B total, 2.4B activated; arXiv 2405.04434): plain query projection
(q_lora_rank=None), softmax routing without groups or bias, two shared experts."""

from experiments.configs import common


def get_config():
  config = common.base_config(dict(
      vocab_size=102_400,
      hidden_size=2048,
      num_layers=27,
      num_heads=16,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      q_lora_rank=None,
      kv_lora_rank=512,
      intermediate_size=10_944,
      moe_intermediate_size=1408,
      first_k_dense=1,
      n_shared_experts=2,
      n_routed_experts=64,
      num_experts_per_tok=6,
      n_group=1,
      topk_group=1,
      routed_scaling_factor=1.0,
      scoring_func='softmax',
      norm_topk_prob=False,
      use_router_bias=False,
      rms_norm_eps=1e-6,
      rope_theta=10_000.0,
      rope_factor=40.0,
      rope_original_max_position=4096,
      rope_beta_fast=32.0,
      rope_beta_slow=1.0,
      rope_mscale=0.707,
      rope_mscale_all_dim=0.707,
      max_position_embeddings=163_840,
      mtp_depth=0,
      init_std=0.006,
      dtype='bfloat16',
      # Each block's input kept, the rest recomputed: V3's train step fits a tpu7x device
      # this way at 8 x 4,096 tokens, V2-Lite's a v5e chip at 4,096 (README, "Compiling for
      # TPU slices"). Scanned layers are ModelConfig's default.
      remat='full',
      moe_matmul='auto',
  ))
  # The output head and cross-entropy 512 positions at a time (train/config.py, loss_chunk).
  config.train.loss_chunk = 512
  return config

"""DeepSeek-V2 (236B total, 21B activated per token; arXiv 2405.04434): MLA with a query latent,
softmax routing limited to 3 of 8 device groups (the group score is the max affinity in the group),
two shared + 160 routed experts, top-6, no MTP (hyperparameters as in the released config.json)."""

from experiments.configs import common


def get_config():
  config = common.base_config(dict(
      vocab_size=102_400,
      hidden_size=5120,
      num_layers=60,
      num_heads=128,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      q_lora_rank=1536,
      kv_lora_rank=512,
      intermediate_size=12_288,
      moe_intermediate_size=1536,
      first_k_dense=1,
      n_shared_experts=2,
      n_routed_experts=160,
      num_experts_per_tok=6,
      n_group=8,
      topk_group=3,
      routed_scaling_factor=16.0,
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
  config.train.seq_len = 4096
  # The output head and cross-entropy 512 positions at a time (train/config.py, loss_chunk).
  config.train.loss_chunk = 512
  return config

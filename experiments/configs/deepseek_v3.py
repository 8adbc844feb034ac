"""DeepSeek-V3, the released 671B model (37B activated per token) with its MTP module
(arXiv 2412.19437; hyperparameters as in the released config.json)."""

from experiments.configs import common


def get_config():
  config = common.base_config(dict(
      vocab_size=129_280,
      hidden_size=7168,
      num_layers=61,
      num_heads=128,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      q_lora_rank=1536,
      kv_lora_rank=512,
      intermediate_size=18_432,
      moe_intermediate_size=2048,
      first_k_dense=3,
      n_shared_experts=1,
      n_routed_experts=256,
      num_experts_per_tok=8,
      n_group=8,
      topk_group=4,
      routed_scaling_factor=2.5,
      scoring_func='sigmoid',
      norm_topk_prob=True,
      use_router_bias=True,
      rms_norm_eps=1e-6,
      rope_theta=10_000.0,
      rope_factor=40.0,
      rope_original_max_position=4096,
      rope_beta_fast=32.0,
      rope_beta_slow=1.0,
      rope_mscale=1.0,
      rope_mscale_all_dim=1.0,
      max_position_embeddings=163_840,
      mtp_depth=1,
      init_std=0.006,
      dtype='bfloat16',
      # Each block's input kept in host memory, the rest recomputed (MaxText's choice): V3's
      # train step at 8 x 4,096 tokens per tpu7x device peaks at 86.97 GB this way, 96.73 GB
      # with the inputs in HBM ('full'); 'none' and 'save_attention' do not fit (README,
      # "Compiling for TPU slices"). Scanned layers are ModelConfig's default.
      remat='offload_inputs',
      moe_matmul='auto',
  ))
  config.train.seq_len = 4096
  config.train.batch_size = 15_360  # sequences per step at the end of the batch-size ramp
  config.train.learning_rate = 2.2e-4
  # The output head and cross-entropy 512 positions at a time (train/config.py, loss_chunk).
  config.train.loss_chunk = 512
  return config

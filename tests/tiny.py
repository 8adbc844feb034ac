"""The tests' one tiny model config (`TINY`, `tiny_config(**overrides)`; also the `tiny_config`
fixture of conftest.py), and models initialised from numpy in milliseconds (eager
`model.create` compiles one random op per parameter shape). A test that needs other sizes says
which by its overrides."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig

# 3 layers (1 dense, 2 MoE) + 1 MTP block; E 8 in G 4 groups, M 2 groups and K 2 experts per token.
TINY = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=16, kv_lora_rank=12,
            intermediate_size=48, moe_intermediate_size=16, first_k_dense=1,
            n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            rope_factor=1.0, max_position_embeddings=256, mtp_depth=1, init_std=0.2)


# The FP8 tests need matrices at least 128 wide (1x128 activation and 128x128 weight blocks).
FP8_WIDTHS = dict(vocab_size=64, hidden_size=128, num_heads=2, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, q_lora_rank=64, kv_lora_rank=32,
                  intermediate_size=256, moe_intermediate_size=64, n_shared_experts=1,
                  n_routed_experts=4, n_group=1, topk_group=1, max_position_embeddings=64,
                  init_std=0.05)


def tiny_config(**overrides) -> ModelConfig:
  return ModelConfig(**{**TINY, **overrides})


def random_model(cfg: ModelConfig, seed: int = 0) -> model_lib.DeepSeekV3:
  """Matrices ~ N(0, init_std), RMSNorm weights in [0.5, 1.5] and router biases ~ N(0, 0.1), so
  that a norm or bias read in the wrong place shows (identity-like values would hide it). Drawn
  layer by layer, then stacked under `scan_layers`: both layouts get the same values."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(model_lib.abstract(cfg.replace(scan_layers=False)))
  leaves = {}
  for path, leaf in nnx.to_flat_state(state):
    shape = leaf.get_value().shape
    name = str(path[-1])
    if name == 'router_bias':
      value = 0.1 * rng.standard_normal(shape)
    elif name == 'weight' and len(shape) == 1:
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = cfg.init_std * rng.standard_normal(shape)
    leaves[path] = leaf.replace(jnp.asarray(value, jnp.float32))
  model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
  return model_lib.stack_layers(model) if cfg.scan_layers else model


def full_logits(model: model_lib.DeepSeekV3, tokens: np.ndarray) -> np.ndarray:
  """The model's logits without any cache, jitted over the split state."""
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, tokens: model_lib.apply(graphdef, state, tokens).logits)
  return np.asarray(run(state, jnp.asarray(tokens)))

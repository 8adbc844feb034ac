"""ModelConfig validation: every impossible combination fails naming the field and its value."""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig

# A small valid MoE config: E 8 in G 4 groups of 2, M 2 groups per token, K 2.
BASE = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=16, kv_lora_rank=12,
            intermediate_size=48, moe_intermediate_size=16, first_k_dense=1, n_shared_experts=1,
            n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            rope_original_max_position=16, max_position_embeddings=64, mtp_depth=1)


def make(**changes) -> ModelConfig:
  return ModelConfig(**{**BASE, **changes})


def assert_fails(changes: dict, field: str, value_text: str, *extra: str):
  """Building with `changes` raises ValueError naming `field`, its value and any `extra` text."""
  with pytest.raises(ValueError) as info:
    make(**changes)
  message = str(info.value)
  assert f'ModelConfig.{field}=' in message, message
  assert value_text in message, message
  for text in extra:
    assert text in message, message


def test_base_and_released_defaults_are_valid():
  cfg = make()
  assert cfg.num_moe_layers == 2
  assert cfg.qk_head_dim == 12
  v3 = ModelConfig()  # the released DeepSeek-V3 671B
  assert v3.kv_cache_values_per_token == 576  # C 512 + R 64 (deepseek_jax/DESIGN.md)
  assert v3.num_moe_layers == 58


def test_topk_group_exceeds_n_group():
  assert_fails(dict(topk_group=5), 'topk_group', '=5', 'n_group=4')


def test_experts_not_divisible_by_groups():
  assert_fails(dict(n_routed_experts=10, n_group=4), 'n_routed_experts', '=10', 'n_group=4')


def test_experts_per_token_exceed_experts():
  assert_fails(dict(num_experts_per_tok=9, n_group=1, topk_group=1), 'num_experts_per_tok', '=9',
               'n_routed_experts=8')


def test_experts_per_token_exceed_group_limited_pool():
  # 2 groups of 2 experts kept -> at most 4 candidates; K = 5 is impossible, K = 4 is fine.
  assert_fails(dict(num_experts_per_tok=5), 'num_experts_per_tok', '=5', 'topk_group=2')
  assert make(num_experts_per_tok=4).num_experts_per_tok == 4


def test_odd_rope_dim():
  assert_fails(dict(qk_rope_head_dim=5), 'qk_rope_head_dim', '=5', 'even')


POSITIVE_FIELDS = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'qk_nope_head_dim',
                   'qk_rope_head_dim', 'v_head_dim', 'kv_lora_rank', 'intermediate_size',
                   'moe_intermediate_size', 'num_experts_per_tok', 'n_group', 'topk_group',
                   'rope_original_max_position', 'max_position_embeddings')
NON_NEGATIVE_FIELDS = ('first_k_dense', 'n_shared_experts', 'n_routed_experts', 'mtp_depth')
POSITIVE_FLOATS = ('routed_scaling_factor', 'rms_norm_eps', 'rope_theta', 'rope_beta_slow',
                   'init_std')


@pytest.mark.parametrize('field', POSITIVE_FIELDS)
@pytest.mark.parametrize('value', [0, -2])
def test_size_must_be_positive(field, value):
  assert_fails({field: value}, field, f'={value}', 'positive')


@pytest.mark.parametrize('field', NON_NEGATIVE_FIELDS)
def test_count_must_be_non_negative(field):
  assert_fails({field: -1}, field, '=-1', 'non-negative')


@pytest.mark.parametrize('field', POSITIVE_FLOATS)
@pytest.mark.parametrize('value', [0.0, -1.5, float('nan')])
def test_float_must_be_positive_finite(field, value):
  assert_fails({field: value}, field, f'={value!r}', 'positive')


def test_sizes_must_be_int_not_float_or_bool():
  assert_fails(dict(hidden_size=32.0), 'hidden_size', '=32.0')
  assert_fails(dict(num_layers=True), 'num_layers', '=True')


def test_q_lora_rank_zero_or_negative():
  assert_fails(dict(q_lora_rank=0), 'q_lora_rank', '=0', 'None')
  assert_fails(dict(q_lora_rank=-16), 'q_lora_rank', '=-16')


def test_first_k_dense_exceeds_layers():
  assert_fails(dict(first_k_dense=4), 'first_k_dense', '=4', 'num_layers=3')


@pytest.mark.parametrize('field,value', [('scoring_func', 'relu'), ('dtype', 'float16'),
                                         ('moe_matmul', 'megablocks')])
def test_unknown_choice(field, value):
  assert_fails({field: value}, field, repr(value))


def test_rope_factor_below_one():
  assert_fails(dict(rope_factor=0.5), 'rope_factor', '=0.5')


@pytest.mark.parametrize('fast,slow', [(1.0, 1.0), (1.0, 32.0)])
def test_rope_beta_fast_must_exceed_slow(fast, slow):
  assert_fails(dict(rope_beta_fast=fast, rope_beta_slow=slow), 'rope_beta_fast', f'={fast!r}',
               f'rope_beta_slow={slow}')


def test_one_expert_per_group_with_router_bias():
  # The group score sums the top-2 biased scores: one expert per group cannot give it.
  assert_fails(dict(n_group=8, topk_group=4), 'n_group', '=8', '1 expert per group')
  # Without the bias, V2's group score (the max) is defined for single-expert groups.
  assert make(n_group=8, topk_group=4, use_router_bias=False).n_group == 8


def test_moe_layers_need_routed_experts():
  assert_fails(dict(n_routed_experts=0), 'n_routed_experts', '=0')


def test_mtp_block_of_all_dense_model_needs_routed_experts():
  # MTP blocks are MoE layers (layer index num_layers + k - 1 >= first_k_dense), as in V3's
  # released checkpoint; an all-dense main model with MTP still needs routed experts.
  assert_fails(dict(first_k_dense=3, n_routed_experts=0, mtp_depth=1), 'n_routed_experts', '=0',
               'mtp_depth=1')


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(ValueError, match=re.escape("unknown field(s) ['n_expert', 'rope_scale']")):
    ModelConfig.from_dict({**BASE, 'n_expert': 8, 'rope_scale': 2.0})


def test_from_dict_round_trip():
  cfg = make(q_lora_rank=None, scoring_func='softmax')
  again = ModelConfig.from_dict(cfg.to_dict())
  assert again == cfg
  assert again.q_lora_rank is None


def test_replace_validates():
  with pytest.raises(ValueError, match=r'ModelConfig\.topk_group=9'):
    make().replace(topk_group=9)


def output_shapes(cfg: ModelConfig, batch: int = 1, length: int = 4):
  """ModelOutput shapes of the model built from `cfg`, traced abstractly (nothing compiled)."""
  graphdef, state = nnx.split(model_lib.abstract(cfg))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  return jax.eval_shape(functools.partial(model_lib.apply, graphdef), state, tokens)


def test_all_dense_model_is_valid_and_has_no_moe_rows():
  # With no MoE layer anywhere the routing fields are unused, even nonsensical ones.
  cfg = make(first_k_dense=3, mtp_depth=0, n_routed_experts=0, topk_group=9)
  assert cfg.num_moe_layers == 0
  out = output_shapes(cfg)
  assert out.logits.shape == (1, 4, 64)
  assert out.mtp_logits.shape == (0, 1, 4, 64)
  assert out.expert_load.shape == (0, 0)
  assert out.seq_balance_loss.shape == (0,)


def test_all_dense_main_model_with_mtp_is_valid():
  cfg = make(first_k_dense=3)  # the MTP block is the only MoE layer
  assert cfg.num_moe_layers == 0
  out = output_shapes(cfg)
  assert out.mtp_logits.shape == (1, 1, 4, 64)
  assert out.expert_load.shape == (1, 8)


def test_plain_query_and_v2_lite_style_routing_are_valid():
  cfg = make(q_lora_rank=None, scoring_func='softmax', use_router_bias=False, n_group=1,
             topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, rope_factor=1.0)
  assert cfg.q_lora_rank is None and not cfg.yarn
  attn = model_lib.abstract(cfg).block(0).attn
  assert attn.w_q.shape == (32, 2, 8) and attn.w_qr.shape == (32, 2, 4)
  assert not hasattr(attn, 'w_dq')
  assert output_shapes(cfg).logits.shape == (1, 4, 64)

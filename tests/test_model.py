"""The whole model on a tiny config: causality through gradients (main blocks and MTP modules),
ModelOutput shapes and router statistics, jit over split state, bfloat16, packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import param
from tests.tiny import tiny_config

# 2 layers (1 dense, 1 MoE) + 2 MTP blocks (MoE): 3 MoE layers. YaRN on (factor 4 over 16).
CFG = tiny_config(vocab_size=64, num_layers=2, num_heads=2, v_head_dim=8, n_shared_experts=1,
                  mtp_depth=2, rope_factor=4.0, rope_original_max_position=16,
                  max_position_embeddings=64, init_std=0.02)
B, T = 2, 8
NUM_MOE = CFG.num_layers - CFG.first_k_dense + CFG.mtp_depth  # MTP blocks are MoE layers


@pytest.fixture(scope='module')
def model():
  m = model_lib.create(CFG, seed=0)
  # A nonzero router bias, as after some balancing steps, so that it takes part in every test.
  rng = np.random.default_rng(0)
  for path, bias in nnx.to_flat_state(nnx.state(m, param.RouterBias)):  # stacked ones too
    bias.set_value(jnp.asarray(rng.standard_normal(bias.get_value().shape) * 0.05, jnp.float32))
  return m


@pytest.fixture(scope='module')
def tokens():
  return jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


@pytest.fixture(scope='module')
def eager_output(model, tokens):
  return model(tokens)


def arange_positions(batch=B, length=T):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))


_apply = jax.jit(model_lib.apply)


def forward(m, tokens, positions, segment_ids):
  graphdef, state = nnx.split(m)
  return _apply(graphdef, state, tokens, positions, segment_ids)


def compose(m, x, next_embeddings, positions):
  """Blocks + final norm + head on embeddings x [B, T, D], then each MTP module on its own
  next-token embeddings [B, T, D] -> logits [1 + P, B, T, V] (main head first)."""
  h = x
  for i in range(m.cfg.num_layers):  # the stacks' layers one by one, not by lax.scan
    h, _, _ = m.block(i)(h, positions)
  outs = [m.logits(m.norm(h))]
  for module, e in zip(m.mtp, next_embeddings):
    h, normed, _, _ = module(h, e, positions)
    outs.append(m.logits(normed))
  return jnp.stack(outs)


def shifted(tokens, k):
  return jnp.concatenate([tokens[:, k:], jnp.zeros((tokens.shape[0], k), tokens.dtype)], axis=1)


def test_composition_is_the_model(model, tokens, eager_output):
  """The hand-composed pipeline used below for gradients is what the model computes."""
  x = model.embed_tokens(tokens)
  nexts = [model.embed_tokens(shifted(tokens, k)) for k in range(1, CFG.mtp_depth + 1)]
  out = jax.jit(lambda x, e: compose(model, x, e, arange_positions()))(x, nexts)
  np.testing.assert_allclose(out[0], eager_output.logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1:], eager_output.mtp_logits, rtol=1e-5, atol=1e-6)


def test_causality_through_gradients(model, tokens):
  """d out[b, t] / d input[b', t'] is exactly 0 unless b' == b and t' <= t, and nonzero there."""
  rng = np.random.default_rng(2)
  inputs = (model.embed_tokens(tokens),
            *[jnp.asarray(rng.standard_normal((B, T, CFG.hidden_size)), jnp.float32)
              for _ in range(CFG.mtp_depth)])
  heads = 1 + CFG.mtp_depth
  fn = lambda x, *e: compose(model, x, e, arange_positions())
  # One cotangent per output row (head j, batch b, position t), random over the vocabulary.
  index = np.stack(np.meshgrid(np.arange(heads), np.arange(B), np.arange(T), indexing='ij'),
                   -1).reshape(-1, 3)
  onehot = np.zeros((len(index), heads, B, T, 1), np.float32)
  onehot[np.arange(len(index)), index[:, 0], index[:, 1], index[:, 2]] = 1.0
  cotangents = jnp.asarray(onehot * rng.standard_normal((len(index), 1, 1, 1, CFG.vocab_size)),
                           jnp.float32)

  @jax.jit
  def all_grads(inputs, cotangents):
    _, pullback = jax.vjp(fn, *inputs)
    return jax.vmap(pullback)(cotangents)  # per input: [rows, B, T, D]

  grads = [np.asarray(g) for g in all_grads(inputs, cotangents)]
  for i, g in enumerate(grads):         # input 0: x; input k >= 1: depth-k next-token embeddings
    norms = np.linalg.norm(g, axis=-1)  # [rows, B', T']
    for row, (j, b, t) in enumerate(index):
      allowed = np.zeros((B, T), bool)
      if i <= j:                        # head j reads x and the embeddings of depths 1..j
        allowed[b, :t + 1] = True
      assert np.all(g[row][~allowed] == 0.0), (i, j, b, t)  # exactly zero, not small
      assert np.all(norms[row][allowed] > 0.0), (i, j, b, t)


def test_output_shapes_and_router_statistics(eager_output):
  out = eager_output
  V, P, E, K = CFG.vocab_size, CFG.mtp_depth, CFG.n_routed_experts, CFG.num_experts_per_tok
  assert out.logits.shape == (B, T, V) and out.logits.dtype == jnp.float32
  assert out.mtp_logits.shape == (P, B, T, V) and out.mtp_logits.dtype == jnp.float32
  assert out.hidden.shape == (B, T, CFG.hidden_size)
  assert NUM_MOE == 3
  assert out.expert_load.shape == (NUM_MOE, E) and out.expert_load.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out.expert_load).sum(-1), B * T * K)
  assert out.seq_balance_loss.shape == (NUM_MOE,)
  # sum_i f_i = E and, at init, router logits are ~ 0.02 * sqrt(D) ~ 0.1, so every score is
  # sigmoid(0) = 0.5 within ~3% and P_i = 1/E within ~3%: sum_i f_i P_i = 1 within a few %.
  np.testing.assert_allclose(np.asarray(out.seq_balance_loss), 1.0, atol=0.05)


def test_jit_apply_over_split_state_equals_eager(model, tokens, eager_output):
  graphdef, state = nnx.split(model)
  out = jax.jit(model_lib.apply)(graphdef, state, tokens)
  np.testing.assert_allclose(out.logits, eager_output.logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.mtp_logits, eager_output.mtp_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.expert_load, eager_output.expert_load)
  np.testing.assert_allclose(out.seq_balance_loss, eager_output.seq_balance_loss, rtol=1e-5)
  # explicit default positions and one segment give the same result
  same = forward(model, tokens, arange_positions(), jnp.zeros((B, T), jnp.int32))
  np.testing.assert_allclose(same.logits, out.logits, rtol=1e-5, atol=1e-6)


def test_bfloat16_forward_stays_close_to_float32(model, tokens):
  m16 = model_lib.create(CFG.replace(dtype='bfloat16'), seed=0)
  nnx.update(m16, nnx.state(model))  # same float32 parameters, incl. the router bias
  ref = forward(model, tokens, arange_positions(), jnp.zeros((B, T), jnp.int32))
  out = forward(m16, tokens, arange_positions(), jnp.zeros((B, T), jnp.int32))
  assert out.hidden.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
  # The router scores in float32 from bfloat16 inputs; on this data no choice flips, so the
  # difference below is rounding only.
  np.testing.assert_array_equal(out.expert_load, ref.expert_load)
  # bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.2%). Every matmul, norm and residual
  # add rounds to it; over 2 blocks + 2 MTP blocks the logits pick up a few such roundings of
  # their own scale. Bounds: max error 4 * 2^-8 of the largest logit, mean error 2 * 2^-8 of
  # the logits' rms (measured 1.3-1.4 * 2^-8 and 0.8-1.0 * 2^-8).
  for name in ('logits', 'mtp_logits'):
    want, got = np.asarray(getattr(ref, name)), np.asarray(getattr(out, name))
    scale = np.abs(want).max()
    err = np.abs(got - want)
    assert err.max() <= 4 * 2.0 ** -8 * scale, (name, err.max(), scale)
    assert err.mean() <= 2 * 2.0 ** -8 * np.sqrt(np.mean(want ** 2)), name
    assert err.max() > 0  # bfloat16 really ran


def test_packed_document_equals_document_alone(model):
  """Row b holds document A (3 tokens) then document B (5 tokens), positions restarting at 0
  for B. B's logits (main and MTP) equal B run alone, padded at the end with token 0."""
  rng = np.random.default_rng(3)
  doc_a = rng.integers(1, CFG.vocab_size, (B, 3))
  doc_b = rng.integers(1, CFG.vocab_size, (B, 5))
  packed = jnp.asarray(np.concatenate([doc_a, doc_b], 1), jnp.int32)
  positions = jnp.asarray(np.tile(np.r_[np.arange(3), np.arange(5)], (B, 1)), jnp.int32)
  segments = jnp.asarray(np.tile(np.r_[[0] * 3, [1] * 5], (B, 1)), jnp.int32)
  # The MTP modules see the next tokens; at B's last positions those are the model's 0 padding,
  # in both runs, so the MTP logits over B must match too.
  alone = jnp.asarray(np.concatenate([doc_b, np.zeros((B, 3), np.int64)], 1), jnp.int32)
  got = forward(model, packed, positions, segments)
  want = forward(model, alone, arange_positions(), jnp.zeros((B, T), jnp.int32))
  np.testing.assert_allclose(got.logits[:, 3:], want.logits[:, :5], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.mtp_logits[:, :, 3:], want.mtp_logits[:, :, :5], rtol=1e-5,
                             atol=1e-6)
  # Without the segment ids, B would attend to A: the test is sensitive to the mask.
  leaky = forward(model, packed, positions, jnp.zeros((B, T), jnp.int32))
  assert np.abs(np.asarray(leaky.logits[:, 3:] - want.logits[:, :5])).max() > 1e-2


@pytest.mark.parametrize('overrides', [{}, dict(first_k_dense=0, mtp_depth=2, q_lora_rank=None)])
def test_param_bytes_counts_every_variable_of_the_abstract_model(tiny_config, overrides):
  cfg = tiny_config(**overrides)
  leaves = jax.tree.leaves(nnx.state(model_lib.abstract(cfg)))
  assert model_lib.param_bytes(cfg) == sum(a.size * a.dtype.itemsize for a in leaves)


def test_create_refuses_at_once_a_model_that_cannot_fit():
  """DeepSeek-V3's default config (671B + MTP, float32 master weights) on one device: the error
  comes before anything is allocated and gives both sizes."""
  need = model_lib.param_bytes(ModelConfig()) / 2**30
  assert 2_450 < need < 2_600  # ~684.5B variables x 4 bytes
  with pytest.raises(MemoryError, match=rf'need {need:,.1f} GiB per device .* GiB available'):
    model_lib.create(ModelConfig())


def test_create_under_a_trace_leaves_the_memory_check_to_the_caller(tiny_config, monkeypatch):
  """The training loop creates its state inside jax.jit with sharded outputs and the analyses
  inside jax.eval_shape: nothing is allocated there, so create must not refuse (V3's 2.5 TB would
  otherwise stop `summary --mesh` and every sharded run); eager creation still refuses."""
  monkeypatch.setattr(model_lib, 'param_bytes', lambda cfg: 2**60)
  cfg = tiny_config()
  shapes = jax.eval_shape(lambda: nnx.state(model_lib.create(cfg)))
  assert jax.tree.leaves(shapes)
  with pytest.raises(MemoryError, match='per device'):
    model_lib.create(cfg)


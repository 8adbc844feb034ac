"""The FP8 precision policy in the model: which matmuls it changes, and how close it stays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.layers import linear, router
from tests.tiny import FP8_WIDTHS, tiny_config

CFG = tiny_config(**FP8_WIDTHS, num_layers=2)


def _loss_and_grads(cfg, tokens):
  graphdef, state = nnx.split(model_lib.create(cfg, 0))

  def loss(state):
    out = model_lib.apply(graphdef, state, tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), out.logits

  # One compiled program: eager autodiff dispatches thousands of small ops one at a time.
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return value, logits, grads


def test_fp8_model_stays_close_to_the_high_precision_model():
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, CFG.vocab_size)
  ref_loss, ref_logits, ref_grads = _loss_and_grads(CFG, tokens)
  loss, logits, grads = _loss_and_grads(CFG.replace(precision='fp8'), tokens)
  assert not np.array_equal(np.asarray(logits), np.asarray(ref_logits))  # FP8 really ran
  rel = np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)
  assert rel < 0.25, rel  # measured 0.16: E4M3 rounding (~4% per GEMM) through 3 blocks at init
  assert abs(float(loss) - float(ref_loss)) / float(ref_loss) < 0.005  # measured 0.08%
  flat, ref_flat = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)])
                    for t in (grads, ref_grads))
  cosine = flat @ ref_flat / (np.linalg.norm(flat) * np.linalg.norm(ref_flat))
  assert cosine > 0.97, cosine  # measured 0.982 over all parameters at once


def test_fp8_leaves_embedding_head_router_and_attention_core_in_high_precision():
  ref = model_lib.create(CFG, 0)
  fp8 = model_lib.create(CFG.replace(precision='fp8'), 0)
  tokens = jax.random.randint(jax.random.key(2), (1, 16), 0, CFG.vocab_size)
  x = ref.embed_tokens(tokens)
  np.testing.assert_array_equal(fp8.embed_tokens(tokens), x)
  np.testing.assert_array_equal(fp8.logits(x), ref.logits(x))
  moe_ref, moe_fp8 = ref.block(1).ffn, fp8.block(1).ffn
  flat = x.reshape(-1, CFG.hidden_size)
  for a, b in zip(router.route(flat, moe_ref.router_kernel[...], moe_ref.router_bias[...], CFG),
                  router.route(flat, moe_fp8.router_kernel[...], moe_fp8.router_bias[...],
                               CFG.replace(precision='fp8'))):
    np.testing.assert_array_equal(a, b)
  # ...while the MLA projections do change.
  positions = jnp.arange(16)[None]
  assert not np.array_equal(fp8.block(0).attn.compress_kv(x, positions)[0],
                            ref.block(0).attn.compress_kv(x, positions)[0])


def test_linear_dispatches_to_fp8():
  x = jax.random.normal(jax.random.key(0), (4, 256))
  w = jax.random.normal(jax.random.key(1), (256, 8))
  exact = x @ w
  fp8 = linear.linear(x, w, precision='fp8')
  err = float(jnp.linalg.norm(fp8 - exact) / jnp.linalg.norm(exact))
  assert 1e-4 < err < 0.05, err  # E4M3 rounding: visible but a few percent at most


def test_precision_is_validated_by_name():
  with pytest.raises(ValueError, match='precision'):
    CFG.replace(precision='fp4')
  with pytest.raises(ValueError, match='moe_matmul'):
    CFG.replace(precision='fp8', moe_matmul='ragged_dot')

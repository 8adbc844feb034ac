"""The attention core's written-out backward pass against float64 numpy and against autodiff; the
blockwise form against it, against float64 numpy, and its memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.layers import attention
from tests import tiny


def _inputs(seed=0, B=2, N=3, T=7, A=5, U=4):
  rng = np.random.default_rng(seed)
  q, k = rng.normal(size=(B, N, T, A)), rng.normal(size=(B, N, T, A))
  v, d_out = rng.normal(size=(B, N, T, U)), rng.normal(size=(B, N, T, U))
  positions = np.broadcast_to(np.arange(T), (B, T))
  segments = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])[:, :T]
  mask = np.asarray(attention.causal_mask(jnp.asarray(positions), jnp.asarray(segments)))
  return q, k, v, d_out, mask


def _numpy_attention(q, k, v, mask, scale):
  scores = np.where(mask, np.einsum('bnta,bnsa->bnts', q, k) * scale, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bnts,bnsu->bntu', probs, v)


def test_forward_matches_float64_numpy():
  q, k, v, _, mask = _inputs()
  out = attention.attend(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(mask), 0.3)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, mask, 0.3), atol=1e-5)


def test_backward_matches_finite_differences_of_float64_numpy():
  q, k, v, d_out, mask = _inputs(1)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
  _, vjp = jax.vjp(lambda *a: attention.attend(*a, jnp.asarray(mask), 0.3), *args)
  grads = vjp(jnp.asarray(d_out, jnp.float32))
  eps = 1e-6
  for which, grad in enumerate(grads):
    base = [q, k, v]
    numeric = np.zeros_like(base[which])
    for index in np.ndindex(base[which].shape):
      plus = [a.copy() for a in base]
      minus = [a.copy() for a in base]
      plus[which][index] += eps
      minus[which][index] -= eps
      numeric[index] = np.sum(d_out * (_numpy_attention(*plus, mask, 0.3)
                                       - _numpy_attention(*minus, mask, 0.3))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-5, err_msg=f'argument {which}')


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_backward_equals_autodiff_of_the_same_forward(dtype):
  q, k, v, d_out, mask = _inputs(2, T=6)
  args = [jnp.asarray(a, dtype) for a in (q, k, v)]
  plain = lambda *a: attention._attend_forward(*a, jnp.asarray(mask), 0.5)[0]
  ours = lambda *a: attention.attend(*a, jnp.asarray(mask), 0.5)
  d_out = jnp.asarray(d_out, dtype)
  expected = jax.vjp(plain, *args)[1](d_out)
  got = jax.vjp(ours, *args)[1](d_out)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  for e, g in zip(expected, got):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), atol=tol)


# ---- blockwise attention -----------------------------------------------------------------------

def _blockwise_inputs(seed, B=2, N=2, T=13, S=13, A=6, U=4, dtype=jnp.float32):
  """q [B, N, T, A], k [B, N, S, A], v [B, N, S, U], d_out; the T queries are the last T of the
  S keys (positions S - T .. S - 1); sequence 0 packs three documents, sequence 1 one."""
  rng = np.random.default_rng(seed)
  q, k = rng.normal(size=(B, N, T, A)), rng.normal(size=(B, N, S, A))
  v, d_out = rng.normal(size=(B, N, S, U)), rng.normal(size=(B, N, T, U))
  k_positions = np.broadcast_to(np.arange(S), (B, S))
  k_segments = np.stack([np.arange(S) * 3 // S, np.zeros(S, int)])[:B]
  positions = (k_positions[:, S - T:], k_positions, k_segments[:, S - T:], k_segments)
  arrays = [jnp.asarray(a, dtype) for a in (q, k, v, d_out)]
  return (q, k, v, d_out), arrays, [jnp.asarray(p, jnp.int32) for p in positions]


def _mask(q_positions, k_positions, q_segments, k_segments):
  """The [B, 1, T, S] mask `attend` takes, from positions and segments."""
  mask = q_positions[:, None, :, None] >= k_positions[:, None, None, :]
  return mask & (q_segments[:, None, :, None] == k_segments[:, None, None, :])


def _numpy_attention_and_grads(q, k, v, d_out, mask, scale):
  """Float64 reference: out and (d_q, d_k, d_v); a fully masked row gives zeros."""
  scores = np.where(mask, np.einsum('bnta,bnsa->bnts', q, k) * scale, -np.inf)
  peak = np.max(scores, -1, keepdims=True)
  probs = np.where(mask, np.exp(scores - np.where(np.isfinite(peak), peak, 0)), 0)
  probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
  d_probs = np.einsum('bntu,bnsu->bnts', d_out, v)
  d_scores = probs * (d_probs - np.sum(probs * d_probs, -1, keepdims=True)) * scale
  return (np.einsum('bnts,bnsu->bntu', probs, v),
          (np.einsum('bnts,bnsa->bnta', d_scores, k), np.einsum('bnts,bnta->bnsa', d_scores, q),
           np.einsum('bnts,bntu->bnsu', probs, d_out)))


def _relative_error(got, expected):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(got - expected)) / np.max(np.abs(expected))


def _value_and_grads(f, arrays):
  q, k, v, d_out = arrays
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(d_out)


@pytest.mark.parametrize('segments', [False, True])
def test_blockwise_equals_attend_values_and_gradients(segments):
  # T = 13 in blocks of 4 queries and S = 21 in blocks of 8 keys: 4 x 3 blocks, both padded.
  _, arrays, (q_pos, k_pos, q_seg, k_seg) = _blockwise_inputs(3, T=13, S=21, A=6, U=4)
  if not segments:
    q_seg, k_seg = None, None
  mask = _mask(q_pos, k_pos, *((q_seg, k_seg) if segments else (q_pos * 0, k_pos * 0)))
  dense = _value_and_grads(lambda *a: attention.attend(*a, mask, 0.4), arrays)
  blockwise = _value_and_grads(
      lambda *a: attention.blockwise_attend(*a, q_pos, k_pos, q_seg, k_seg, 0.4, 4, 8), arrays)
  for name, got, expected in zip(('out', 'd_q', 'd_k', 'd_v'), jax.tree.leaves(blockwise),
                                 jax.tree.leaves(dense)):
    assert got.shape == expected.shape
    assert _relative_error(got, expected) <= 1e-5, name


def test_blockwise_matches_float64_numpy():
  (q, k, v, d_out), arrays, positions = _blockwise_inputs(4, T=11, S=19, A=5, U=3)
  mask = np.asarray(_mask(*positions))
  out, grads = _value_and_grads(
      lambda *a: attention.blockwise_attend(*a, *positions, 0.3, 4, 8), arrays)
  expected_out, expected_grads = _numpy_attention_and_grads(q, k, v, d_out, mask, 0.3)
  errors = [_relative_error(g, e) for g, e in zip((out, *grads), (expected_out, *expected_grads))]
  print('blockwise vs float64 numpy, relative max error (out, d_q, d_k, d_v):', errors)
  assert max(errors) <= 1e-5


def test_blockwise_fully_masked_rows_give_zeros():
  # Queries of segment 7 see no key (no key carries it): zeros out, zero gradients, as `attend`.
  (q, k, v, d_out), arrays, (q_pos, k_pos, q_seg, k_seg) = _blockwise_inputs(5, T=9, S=9)
  q_seg = q_seg.at[:, 2:5].set(7)
  out, grads = _value_and_grads(
      lambda *a: attention.blockwise_attend(*a, q_pos, k_pos, q_seg, k_seg, 0.5, 4, 4), arrays)
  assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(out[:, :, 2:5], 0.0)
  np.testing.assert_array_equal(grads[0][:, :, 2:5], 0.0)
  mask = np.asarray(_mask(q_pos, k_pos, q_seg, k_seg))
  expected_out, expected_grads = _numpy_attention_and_grads(q, k, v, d_out, mask, 0.5)
  for got, expected in zip((out, *grads), (expected_out, *expected_grads)):
    assert _relative_error(got, expected) <= 1e-5


def _lowered_text(implementation, platform):
  _, (q, k, v, _), (positions, _, segments, _) = _blockwise_inputs(6, T=8, S=8)
  f = lambda q, k, v: attention.self_attend(q, k, v, positions, segments, 0.5, implementation)
  return jax.jit(f).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()


def test_auto_follows_the_platform_lowered_for():
  # The blockwise form is the only one with a loop (its lax.scan over key blocks).
  assert 'stablehlo.while' in _lowered_text('blockwise', 'cpu')
  assert 'stablehlo.while' not in _lowered_text('dense', 'tpu')
  assert 'stablehlo.while' not in _lowered_text('auto', 'cpu')  # dense, as today, on a CPU
  assert 'stablehlo.while' in _lowered_text('auto', 'tpu')      # even though this host is a CPU


def _temp_bytes(attend_fn, T, N=2, A=8, U=8):
  """XLA:CPU's temporaries for the gradient of one attention at sequence length T."""
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T))
  loss = lambda q, k, v: jnp.sum(attend_fn(q, k, v, positions) ** 2)
  shapes = [jax.ShapeDtypeStruct((1, N, T, width), jnp.float32) for width in (A, A, U)]
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_does_not_grow_with_t_squared():
  dense = lambda q, k, v, p: attention.self_attend(q, k, v, p, None, 0.5, 'dense')
  blockwise = lambda q, k, v, p: attention.blockwise_attend(q, k, v, p, p, None, None, 0.5, 128,
                                                            128)
  figures = {name: [_temp_bytes(f, T) for T in (256, 1024)]
             for name, f in (('dense', dense), ('blockwise', blockwise))}
  print('temp bytes of grad(attention) at T = 256, 1024:', figures)
  dense_growth = figures['dense'][1] / figures['dense'][0]
  blockwise_growth = figures['blockwise'][1] / figures['blockwise'][0]
  assert dense_growth > 10      # [T, S] probabilities kept for the backward pass: ~16x
  assert blockwise_growth < 6   # q, k, v-sized buffers and fixed-size blocks: ~4x or less
  assert figures['blockwise'][1] * 4 < figures['dense'][1]


def test_mla_blockwise_equals_dense():
  # One dense layer's MLA, no cache, two packed documents in sequence 0: model.attention only
  # changes the core MLA.__call__ calls.
  B, T = 2, 11
  cfg = tiny.tiny_config(num_layers=1, first_k_dense=1, mtp_depth=0)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(B, T, cfg.hidden_size)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  segments = jnp.asarray(np.stack([np.arange(T) * 2 // T, np.zeros(T, int)]), jnp.int32)
  results = []
  for implementation in ('dense', 'blockwise'):
    layer = tiny.random_model(cfg.replace(attention=implementation), seed=2).block(0).attn
    loss = lambda x: jnp.sum(layer(x, positions, segments)[0] ** 2)
    results.append(jax.jit(jax.value_and_grad(loss))(x))
  for got, expected in zip(results[1], results[0]):
    assert _relative_error(got, expected) <= 1e-5


def test_one_layer_train_step_memory_does_not_grow_with_t_squared():
  """A whole one-layer model's gradient (MLA, FFN, head; no remat), compiled at T = 1,024 and
  4,096 (both past the 512 x 512 blocks): XLA's temporaries grow ~16x with the dense core (the
  [B, N, T, S] probabilities kept for the backward pass) and about linearly with the blockwise
  one."""
  cfg = tiny.tiny_config(num_layers=1, first_k_dense=1, mtp_depth=0, max_position_embeddings=4096)

  def temp_bytes(implementation, T):
    graphdef, state = nnx.split(model_lib.abstract(cfg.replace(attention=implementation)))
    loss = lambda state, tokens: jnp.mean(model_lib.apply(graphdef, state, tokens).logits ** 2)
    tokens = jax.ShapeDtypeStruct((2, T), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(state, tokens).compile().memory_analysis(
        ).temp_size_in_bytes

  figures = {name: [temp_bytes(name, T) for T in (1024, 4096)] for name in ('dense', 'blockwise')}
  print('temp bytes of a one-layer grad step at T = 1024, 4096:', figures)
  assert figures['dense'][1] / figures['dense'][0] > 10
  assert figures['blockwise'][1] / figures['blockwise'][0] < 6

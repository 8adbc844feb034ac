"""The attention core's written-out backward pass against float64 numpy and against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers import attention


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

"""The linear layers' written-out backward pass equals autodiff of the plain einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers import linear


@pytest.mark.parametrize('out_dtype', [None, jnp.float32])
def test_linear_value_and_gradients_equal_float64_numpy(out_dtype):
  rng = np.random.default_rng(0)
  x, w, d_y = rng.normal(size=(2, 5, 7)), rng.normal(size=(7, 3)), rng.normal(size=(2, 5, 3))
  y, vjp = jax.vjp(lambda a, b: linear.linear(a, b, out_dtype),
                   jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  d_x, d_w = vjp(jnp.asarray(d_y, jnp.float32))
  np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_x, d_y @ w.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_w, np.einsum('bti,bto->io', x, d_y), rtol=1e-5, atol=1e-5)


def test_batched_linear_gradients_equal_autodiff_and_keep_dtypes():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 6, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(4, 8, 5)), jnp.bfloat16)
  d_y = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.bfloat16)
  plain = jax.vjp(lambda a, b: jnp.einsum('EZI,EIO->EZO', a, b), x, w)[1](d_y)
  ours = jax.vjp(linear.batched_linear, x, w)[1](d_y)
  for p, o in zip(plain, ours):
    assert o.dtype == p.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(p, np.float32), rtol=2e-2,
                               atol=2e-2)


def test_float32_weights_get_float32_gradients_from_bfloat16_activations():
  x = jnp.ones((3, 4), jnp.bfloat16)
  w = jnp.ones((4, 2), jnp.float32)
  d_w = jax.grad(lambda w: jnp.sum(linear.linear(x, w).astype(jnp.float32)))(w)
  assert d_w.dtype == jnp.float32
  np.testing.assert_allclose(d_w, np.full((4, 2), 3.0))

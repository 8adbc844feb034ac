"""Matrix products of the model's linear layers, with the backward pass written out.

`linear(x, w)` is `x @ w` for x [..., I] and w [I, O]; `batched_linear` is the same per expert
(`'EZI,EIO->EZO'`). Their gradients are the textbook ones, dx = dy wᵀ and dw = xᵀ dy, with xᵀ
materialized first: XLA:CPU's fast dot (YNNPACK) wants the contracted dimension of its left
operand last, and when autodiff leaves the transpose to XLA it fuses the producer's elementwise
work (SwiGLU, norms) into a strided transpose that costs more than the matmul itself. On the
tiny config this halves the time of a SwiGLU layer's forward + backward. GPU and TPU compilers
handle either form; the custom rule costs them nothing.

A weight kept in E4M3 (`fp8.QuantizedWeight`, `ModelConfig.fp8_weights`) goes to the FP8 GEMM
as it is stored, forward only (inference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax import fp8


def linear(x: jax.Array, w: jax.Array, out_dtype=None, precision: str = 'bf16',
           fp8_kernel: str = 'auto') -> jax.Array:
  """x [..., I] @ w [I, O] -> [..., O], computed in x's dtype (accumulated in `out_dtype`), or
  with precision='fp8' as the block-scaled FP8 GEMMs of `deepseek_jax.fp8` (forward and both
  gradients), run by `fp8_kernel` ('auto', 'pallas' or 'xla', see `fp8.matmul.kernel_impl`)."""
  K, N = w.shape
  if isinstance(w, fp8.QuantizedWeight):  # kept E4M3 weights: the FP8 forward, as stored
    _check_kept(precision)
    impl = fp8.matmul.kernel_impl(fp8_kernel)
    return fp8.matmul.matmul(x, w, impl=impl).astype(out_dtype or x.dtype)
  if precision == 'fp8':
    impl = fp8.matmul.kernel_impl(fp8_kernel)
    return fp8.linear(x, w, impl=impl).astype(out_dtype or x.dtype)
  rows = x.reshape(1, -1, K)
  out = batched_linear(rows, w.astype(x.dtype)[None], out_dtype)
  return out.reshape(x.shape[:-1] + (N,))


def batched_linear(x: jax.Array, w: jax.Array, out_dtype=None, precision: str = 'bf16',
                   fp8_kernel: str = 'auto') -> jax.Array:
  """x [E, Z, I] @ w [E, I, O] -> [E, Z, O] (one product per expert E)."""
  if isinstance(w, fp8.QuantizedWeight):
    _check_kept(precision)
    impl = fp8.matmul.kernel_impl(fp8_kernel)
    matmul = lambda x, w: fp8.matmul.matmul(x, w, impl=impl)
    return jax.vmap(matmul)(x, w).astype(out_dtype or x.dtype)
  if precision == 'fp8':
    impl = fp8.matmul.kernel_impl(fp8_kernel)
    return fp8.expert_linear(x, w.astype(x.dtype), impl=impl).astype(out_dtype or x.dtype)
  return _batched_linear(x, w, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _batched_linear(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  return jnp.einsum('EZI,EIO->EZO', x, w, preferred_element_type=out_dtype)


def _forward(x, w, out_dtype):
  return _batched_linear(x, w, out_dtype), (x, w)


def _backward(out_dtype, residuals, d_y):
  del out_dtype
  x, w = residuals
  d_y = d_y.astype(x.dtype)
  d_x = jnp.einsum('EZO,EIO->EZI', d_y, w)
  d_w = jnp.einsum('EIZ,EZO->EIO', transposed(x), d_y)
  return d_x, d_w.astype(w.dtype)


_batched_linear.defvjp(_forward, _backward)


def _check_kept(precision: str) -> None:
  if precision != 'fp8':
    raise ValueError(f"a weight kept in E4M3 (fp8.QuantizedWeight) needs precision='fp8', got "
                     f'{precision!r}')


def transposed(x: jax.Array) -> jax.Array:
  """Swaps the last two axes, materialized: the barrier keeps XLA from folding the transpose
  back into the consuming dot (which XLA:CPU then runs as a slow generic loop)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))

"""Grouped expert SwiGLU over rows sorted by expert: one function, an implementation per backend.

`jax.lax.ragged_dot` is the natural primitive and is fast on GPU/TPU, but slow on XLA:CPU (see
deepseek_jax/DESIGN.md, "Environment facts"). The `blocked` form pads every expert's rows to a
multiple of a block, so the padded row count has a static bound `Z + E * (block - 1)`, and runs
one batched einsum over blocks with each block's expert weights. Both are dropless and compute
the same thing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax import fp8
from deepseek_jax.layers import linear

BLOCK_ROWS = 128  # measured on the tiny config: 32 rows took 1.4x longer, 1024 rows 1.3x


def expert_swiglu(x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, impl: str = 'auto', precision: str = 'bf16',
                  fp8_kernel: str = 'auto') -> jax.Array:
  """x [Z, D] sorted by expert, group_sizes [E] summing to Z, w_gate/w_up [E, D, F],
  w_down [E, F, D] -> [Z, D], row z passed through the SwiGLU of its expert.

  precision='fp8' runs the blocked form with FP8 block-scaled GEMMs (ragged_dot has no FP8 form),
  run by `fp8_kernel` (see `linear.linear`).
  """
  if impl == 'auto':
    impl = 'blocked' if jax.default_backend() == 'cpu' or precision == 'fp8' else 'ragged_dot'
  if impl == 'ragged_dot':
    if precision == 'fp8':
      raise ValueError("expert_swiglu: precision='fp8' needs impl='blocked' (or 'auto')")
    return _ragged_dot_swiglu(x, group_sizes, w_gate, w_up, w_down)
  if impl == 'blocked':
    return _blocked_swiglu(x, group_sizes, w_gate, w_up, w_down, precision=precision,
                           fp8_kernel=fp8_kernel)
  raise ValueError(f"expert_swiglu: impl={impl!r}, expected 'auto', 'ragged_dot' or 'blocked'")


def _ragged_dot_swiglu(x, group_sizes, w_gate, w_up, w_down):
  gate = jax.lax.ragged_dot(x, w_gate, group_sizes)
  up = jax.lax.ragged_dot(x, w_up, group_sizes)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def _blocked_swiglu(x, group_sizes, w_gate, w_up, w_down, block: int = BLOCK_ROWS,
                    precision: str = 'bf16', fp8_kernel: str = 'auto'):
  Z, D = x.shape
  E = group_sizes.shape[0]
  block = max(1, min(block, Z))
  num_blocks = -(-(Z + E * (block - 1)) // block)  # static bound on padded blocks
  Z_pad = num_blocks * block
  group_sizes = group_sizes.astype(jnp.int32)
  padded_sizes = -(-group_sizes // block) * block
  start = jnp.cumsum(group_sizes) - group_sizes           # first sorted row of each expert
  padded_start = jnp.cumsum(padded_sizes) - padded_sizes  # first padded row of each expert
  row_expert = jnp.repeat(jnp.arange(E, dtype=jnp.int32), group_sizes, total_repeat_length=Z)
  slot = padded_start[row_expert] + jnp.arange(Z, dtype=jnp.int32) - start[row_expert]  # [Z]
  # Expert of each padded row; rows past the last expert's take the last expert (and are zero).
  padded_row = jnp.arange(Z_pad, dtype=jnp.int32)
  padded_expert = jnp.minimum(
      jnp.searchsorted(jnp.cumsum(padded_sizes), padded_row, side='right'), E - 1)
  offset = padded_row - padded_start[padded_expert]
  source = jnp.where(offset < group_sizes[padded_expert], start[padded_expert] + offset, Z)
  x_blocks = take_rows(x, source, slot).reshape(num_blocks, block, D)
  block_expert = padded_expert[::block]

  def expert_matmul(rows, w):  # 'nZD,nDF->nZF': n blocks of Z rows, each with its expert's weights
    return linear.batched_linear(rows, _block_weights(w, block_expert), precision=precision,
                                 fp8_kernel=fp8_kernel)

  gate = expert_matmul(x_blocks, w_gate)
  up = expert_matmul(x_blocks, w_up)
  out = expert_matmul(jax.nn.silu(gate) * up, w_down)
  return take_rows(out.reshape(Z_pad, D), slot, source)


def _block_weights(w: jax.Array, block_expert: jax.Array) -> jax.Array:
  """w [E, I, O] -> the weights of each block's expert [n, I, O], as a one-hot matmul: its
  gradient is the per-expert sum of the blocks' gradients, without XLA:CPU's slow scatter-add.
  Kept E4M3 weights (inference, no gradient) are gathered as they are, values and scales."""
  if isinstance(w, fp8.QuantizedWeight):
    return jax.tree.map(lambda a: jnp.take(a, block_expert, axis=0), w)
  E, I, O = w.shape
  one_hot = jax.nn.one_hot(block_expert, E, dtype=w.dtype)
  return linear.linear(one_hot, w.reshape(E, I * O)).reshape(-1, I, O)


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """y[i] = x[index[i]], or zeros where index[i] is out of range; `index` must be one-to-one on
  its in-range entries and `inverse` [len(x)] its inverse (out of range for rows of x that no
  y row takes). The gradient is then a gather too, not a scatter-add."""
  return jnp.take(x, index, axis=0, mode='fill', fill_value=0)


def _take_rows_fwd(x, index, inverse):
  return take_rows(x, index, inverse), (index, inverse)


def _take_rows_bwd(residuals, d_y):
  index, inverse = residuals
  return jnp.take(d_y, inverse, axis=0, mode='fill', fill_value=0), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)

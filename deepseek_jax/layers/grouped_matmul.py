"""Grouped expert SwiGLU over rows sorted by expert: one function, an implementation per backend.

`jax.lax.ragged_dot` is the natural primitive and is fast on GPU/TPU, but slow on XLA:CPU (see
DESIGN.md, environment facts). The `blocked` form pads every expert's rows to a multiple of a
block, so the padded row count has a static bound `rows + E * (block - 1)`, and runs one batched
einsum over blocks with each block's expert weights. Both are dropless and compute the same thing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.layers import linear

BLOCK_ROWS = 32


def expert_swiglu(x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, impl: str = 'auto') -> jax.Array:
  """x [M, D] sorted by expert, group_sizes [E] summing to M, w_gate/w_up [E, D, F],
  w_down [E, F, D] -> [M, D], row m passed through the SwiGLU of its expert."""
  if impl == 'auto':
    impl = 'blocked' if jax.default_backend() == 'cpu' else 'ragged_dot'
  if impl == 'ragged_dot':
    return _ragged_dot_swiglu(x, group_sizes, w_gate, w_up, w_down)
  if impl == 'blocked':
    return _blocked_swiglu(x, group_sizes, w_gate, w_up, w_down)
  raise ValueError(f"expert_swiglu: impl={impl!r}, expected 'auto', 'ragged_dot' or 'blocked'")


def _ragged_dot_swiglu(x, group_sizes, w_gate, w_up, w_down):
  gate = jax.lax.ragged_dot(x, w_gate, group_sizes)
  up = jax.lax.ragged_dot(x, w_up, group_sizes)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def _blocked_swiglu(x, group_sizes, w_gate, w_up, w_down, block: int = BLOCK_ROWS):
  M, D = x.shape
  E = group_sizes.shape[0]
  block = max(1, min(block, M))
  num_blocks = -(-(M + E * (block - 1)) // block)  # static bound on padded blocks
  group_sizes = group_sizes.astype(jnp.int32)
  padded_sizes = -(-group_sizes // block) * block
  start = jnp.cumsum(group_sizes) - group_sizes           # first sorted row of each expert
  padded_start = jnp.cumsum(padded_sizes) - padded_sizes  # first padded row of each expert
  row_expert = jnp.repeat(jnp.arange(E, dtype=jnp.int32), group_sizes, total_repeat_length=M)
  slot = padded_start[row_expert] + jnp.arange(M, dtype=jnp.int32) - start[row_expert]  # [M]
  x_blocks = jnp.zeros((num_blocks * block, D), x.dtype).at[slot].set(x)
  x_blocks = x_blocks.reshape(num_blocks, block, D)
  # Expert of each block; blocks past the last expert's rows hold zeros and take the last expert.
  padded_end = jnp.cumsum(padded_sizes)
  block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side='right'), E - 1)
  gate = linear.batched_linear(x_blocks, w_gate[block_expert])   # 'nbD,nDF->nbF'
  up = linear.batched_linear(x_blocks, w_up[block_expert])
  out = linear.batched_linear(jax.nn.silu(gate) * up, w_down[block_expert])
  return out.reshape(num_blocks * block, D)[slot]

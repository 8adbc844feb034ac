"""SwiGLU feed-forward: down(silu(x W_gate) * (x W_up)); the dense layers and the shared experts."""

from __future__ import annotations

import jax
from flax import nnx

from deepseek_jax.layers import linear, param


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
           precision: str = 'bf16', fp8_kernel: str = 'auto') -> jax.Array:
  gate = linear.linear(x, w_gate, precision=precision, fp8_kernel=fp8_kernel)
  up = linear.linear(x, w_up, precision=precision, fp8_kernel=fp8_kernel)
  return linear.linear(jax.nn.silu(gate) * up, w_down, precision=precision,
                       fp8_kernel=fp8_kernel)


class SwiGLU(nnx.Module):

  def __init__(self, hidden_size: int, intermediate_size: int, std: float, rngs: nnx.Rngs,
               precision: str = 'bf16', fp8_kernel: str = 'auto', fp8_weights: bool = False):
    D, F = hidden_size, intermediate_size
    self.precision = precision
    self.fp8_kernel = fp8_kernel
    self.w_gate, self.w_gate_scale = param.linear_weight(rngs, (D, F), ('embed', 'mlp'), std,
                                                         fp8_weights)
    self.w_up, self.w_up_scale = param.linear_weight(rngs, (D, F), ('embed', 'mlp'), std,
                                                     fp8_weights)
    self.w_down, self.w_down_scale = param.linear_weight(rngs, (F, D), ('mlp', 'embed'), std,
                                                         fp8_weights)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    return swiglu(x, param.weight(self.w_gate, self.w_gate_scale, dt),
                  param.weight(self.w_up, self.w_up_scale, dt),
                  param.weight(self.w_down, self.w_down_scale, dt), self.precision,
                  self.fp8_kernel)

"""DeepSeekMoE layer (V3 eq. 12): h' = u + sum shared FFN(u) + sum_i g_i FFN_i(u), dropless.

Dispatch sorts the T*K (token, expert) pairs by expert and runs each expert's SwiGLU on exactly
its rows (`grouped_matmul.expert_swiglu`); combine scatters the rows back and sums them with the
gates. No token is dropped and no expert computes on tokens it was not given.

Under `jax.set_mesh(mesh)` with more than one device the routed experts run in `shard_map`
(`layers/expert_parallel.moe_ep`): expert-parallel when 'expert' x 'plane' > 1, and per device
under data parallelism alone (`expert_parallel.ambient_mesh` says why). The router, the shared
experts and the statistics stay outside shard_map, auto-sharded by jit.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.layers import expert_parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import grouped_matmul, param, router
from deepseek_jax.layers.ffn import SwiGLU


class MoEStats(typing.NamedTuple):
  expert_load: jax.Array       # [E] int32, (token, slot) pairs routed to each expert
  seq_balance_loss: jax.Array  # [] float32, eqs. 17-20 without alpha
  experts: jax.Array           # [B, T, K] int32, the routed experts of each token (bias included)


def dispatch_combine(x: jax.Array, routing: router.Routing, group_sizes: jax.Array,
                     w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, impl: str,
                     precision: str = 'bf16', fp8_kernel: str = 'auto') -> jax.Array:
  """x [T, D] -> sum_k gates[t, k] * FFN_{experts[t, k]}(x[t]), [T, D].

  `group_sizes` [E] is `router.expert_load(routing.experts, E)`: rows per expert once sorted.
  """
  T, K = routing.experts.shape
  order = jnp.argsort(routing.experts.reshape(T * K), stable=True)  # pairs sorted by expert
  inverse = jnp.argsort(order)                                        # pair -> sorted row
  pairs = jnp.broadcast_to(x[:, None, :], (T, K, x.shape[-1])).reshape(T * K, -1)
  rows = grouped_matmul.expert_swiglu(grouped_matmul.take_rows(pairs, order, inverse),
                                      group_sizes, w_gate, w_up, w_down, impl, precision,
                                      fp8_kernel)
  per_slot = grouped_matmul.take_rows(rows, inverse, order).reshape(T, K, -1)  # [T, K, D]
  return jnp.einsum('TKD,TK->TD', per_slot, routing.gates.astype(x.dtype))


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    std = cfg.init_std
    self.cfg = cfg
    self.router_kernel = param.normal(rngs, (D, E), ('embed', 'expert'), std)
    self.router_bias = param.router_bias(E) if cfg.use_router_bias else None
    kept = dict(fp8_weights=cfg.fp8_weights, lead=1)  # E4M3 values + scales, or float32
    self.w_gate, self.w_gate_scale = param.linear_weight(
        rngs, (E, D, F), ('expert', 'embed', 'mlp'), std, **kept)
    self.w_up, self.w_up_scale = param.linear_weight(
        rngs, (E, D, F), ('expert', 'embed', 'mlp'), std, **kept)
    self.w_down, self.w_down_scale = param.linear_weight(
        rngs, (E, F, D), ('expert', 'mlp', 'embed'), std, **kept)
    self.shared_experts = (SwiGLU(D, F * cfg.n_shared_experts, std, rngs, cfg.precision,
                                  cfg.fp8_matmul_kernel, cfg.fp8_weights)
                           if cfg.n_shared_experts else None)

  def __call__(self, u: jax.Array) -> tuple[jax.Array, MoEStats]:
    """u [B, T, D] -> (routed + shared expert output [B, T, D], statistics)."""
    B, T, D = u.shape
    dt = u.dtype
    tokens = u.reshape(B * T, D)
    bias = None if self.router_bias is None else self.router_bias[...]
    routing = router.route(tokens, self.router_kernel[...], bias, self.cfg)
    load = router.expert_load(routing.experts, self.cfg.n_routed_experts)
    weights = (param.weight(self.w_gate, self.w_gate_scale, dt),
               param.weight(self.w_up, self.w_up_scale, dt),
               param.weight(self.w_down, self.w_down_scale, dt))
    mesh = expert_parallel.ambient_mesh()
    if mesh is not None:  # several devices: dispatch in shard_map (all-to-all over experts)
      out = expert_parallel.moe_ep(u, routing.experts, routing.gates, *weights, mesh, self.cfg)
    else:
      out = dispatch_combine(tokens, routing, load, *weights, self.cfg.moe_matmul,
                             self.cfg.precision, self.cfg.fp8_matmul_kernel).reshape(B, T, D)
    if self.shared_experts is not None:
      out = out + self.shared_experts(u)
    stats = MoEStats(load, router.sequence_balance_loss(routing, B, self.cfg),
                     routing.experts.reshape(B, T, -1))
    return out, stats

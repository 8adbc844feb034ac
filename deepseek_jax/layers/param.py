"""Parameter constructors that attach logical axis names for the sharding rules table.

Logical names used across the model: `vocab`, `embed`, `heads`, `head_dim` (both H and U),
`q_latent`, `kv_latent`, `rope`, `mlp`, `expert`, `norm`, `mtp_in` (the 2D input of an MTP
module's eh_proj). `sharding.rules` maps each of them to mesh axes (deepseek_jax/DESIGN.md,
"Sharding and the multi-plane mesh"); a name missing there is an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RouterBias(nnx.Variable):
  """Aux-loss-free balancing bias b_i: picks experts only, gets no gradient and no decay."""


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...],
           std: float) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  # The barrier keeps XLA from fusing the scale into the sampler, so an initialisation under jit
  # (sharded on a mesh) gives bit for bit the values of an eager one.
  value = std * jax.lax.optimization_barrier(jax.random.normal(rngs.params(), shape, jnp.float32))
  return nnx.Param(value, out_sharding=axes)


def ones(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, jnp.float32), out_sharding=axes)


def router_bias(num_experts: int) -> RouterBias:
  return RouterBias(jnp.zeros((num_experts,), jnp.float32), out_sharding=('expert',))

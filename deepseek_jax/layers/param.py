"""Parameter constructors that attach logical axis names for the sharding rules table.

Logical names used across the model: `vocab`, `embed`, `heads`, `head_dim` (both H and U),
`q_latent`, `kv_latent`, `rope`, `mlp`, `expert`, `norm`, `mtp_in` (the 2D input of an MTP
module's eh_proj). `sharding.rules` maps each of them to mesh axes (deepseek_jax/DESIGN.md,
"Sharding and the multi-plane mesh"); a name missing there is an error.

`linear_weight` makes a matrix that precision='fp8' multiplies in FP8: a float32 `nnx.Param`, or
under `ModelConfig.fp8_weights` an E4M3 one with an `Fp8Scale` sibling (`<name>_scale`), which
`weight` hands to `layers.linear` together as one `fp8.QuantizedWeight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import fp8


class RouterBias(nnx.Variable):
  """Aux-loss-free balancing bias b_i: picks experts only, gets no gradient and no decay."""


class Fp8Scale(nnx.Variable):
  """The scales of a weight kept in E4M3 (`fp8.QuantizedWeight.scales`); never trained."""


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


def linear_weight(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...],
                  std: float, fp8_weights: bool = False, lead: int = 0,
                  in_dims: int = 1) -> tuple[nnx.Param, Fp8Scale | None]:
  """(weight, None), or with `fp8_weights` (E4M3 weight, its scales): the weight's dims are
  `lead` (expert) dims, `in_dims` contracted ones, then the output dims. The scales replace the
  contracted dims by one of 128-row blocks, which stays whole on every device (None axis)."""
  w = normal(rngs, shape, axes, std)
  if not fp8_weights:
    return w, None
  kept = fp8.quantize_weight(w.get_value(), lead, in_dims)
  scale_axes = axes[:lead] + (None,) + axes[lead + in_dims:]
  return (nnx.Param(kept.values, out_sharding=axes),
          Fp8Scale(kept.scales, out_sharding=scale_axes))


def follows_param_dtype(variable: nnx.Variable) -> bool:
  """Whether a variable is stored in the `param_dtype` a model is loaded or served in: every float
  `nnx.Param` but the weights kept in E4M3 (router biases and FP8 scales are no Params)."""
  dtype = variable.get_value().dtype
  return (isinstance(variable, nnx.Param) and jnp.issubdtype(dtype, jnp.floating)
          and dtype != fp8.FP8)


def weight(w: nnx.Param, scale: Fp8Scale | None, dtype=None) -> jax.Array | fp8.QuantizedWeight:
  """What a linear layer multiplies: the weight (cast to `dtype` when given), or the kept E4M3
  weight with its scales, as they are stored."""
  if scale is not None:
    return fp8.QuantizedWeight(w[...], scale[...])
  return w[...] if dtype is None else w[...].astype(dtype)

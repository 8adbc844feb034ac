"""The DeepSeek-V3 language model: embedding, L decoder blocks, final norm, head, P MTP modules.

`DeepSeekV3(cfg, rngs)(tokens)` returns a `ModelOutput` with the main logits, the MTP logits per
depth and the router statistics of every MoE layer (main layers first, then MTP blocks). At a jit
boundary use `nnx.split` and `apply(graphdef, state, tokens)`, a pure function of arrays.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import linear, param
from deepseek_jax.layers.block import Block
from deepseek_jax.layers.mtp import MTPModule
from deepseek_jax.layers.norm import RMSNorm


@struct.dataclass
class ModelOutput:
  logits: jax.Array            # [B, T, V] float32, predicts token t+1
  mtp_logits: jax.Array        # [P, B, T, V] float32, depth k (1-based) predicts token t+k+1
  hidden: jax.Array            # [B, T, D] last block's output, before the final norm (h^0)
  expert_load: jax.Array       # [M, E] int32, one row per MoE layer (main, then MTP blocks)
  seq_balance_loss: jax.Array  # [M] float32, eqs. 17-20 per MoE layer, without alpha


class DeepSeekV3(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, V = cfg.hidden_size, cfg.vocab_size
    self.cfg = cfg
    self.embed = param.normal(rngs, (V, D), ('vocab', 'embed'), cfg.init_std)
    self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(D, cfg.rms_norm_eps)
    self.head = param.normal(rngs, (D, V), ('embed', 'vocab'), cfg.init_std)  # untied
    self.mtp = nnx.List([MTPModule(cfg, k + 1, rngs) for k in range(cfg.mtp_depth)])

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))

  def logits(self, normed_hidden: jax.Array) -> jax.Array:
    """The shared output head, accumulated in float32."""
    return linear.linear(normed_hidden, self.head[...], out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> ModelOutput:
    """tokens [B, T] int -> ModelOutput. positions default to 0..T-1."""
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    x = self.embed_tokens(tokens)
    stats = []
    for block in self.layers:
      x, layer_stats = block(x, positions, segment_ids)
      stats.append(layer_stats)
    hidden = x
    logits = self.logits(self.norm(x))
    mtp_logits = []
    h = hidden
    for k, module in enumerate(self.mtp, start=1):
      # Token t_{i+k} for position i; the last k positions have no such token and see padding
      # (their MTP targets do not exist either, so the loss masks them).
      next_tokens = jnp.concatenate([tokens[:, k:], jnp.zeros((B, k), tokens.dtype)], axis=1)
      h, normed, layer_stats = module(h, self.embed_tokens(next_tokens), positions, segment_ids)
      mtp_logits.append(self.logits(normed))
      stats.append(layer_stats)
    moe_stats = [s for s in stats if s is not None]
    E = self.cfg.n_routed_experts
    return ModelOutput(
        logits=logits,
        mtp_logits=(jnp.stack(mtp_logits) if mtp_logits
                    else jnp.zeros((0,) + logits.shape, jnp.float32)),
        hidden=hidden,
        expert_load=(jnp.stack([s.expert_load for s in moe_stats]) if moe_stats
                     else jnp.zeros((0, E), jnp.int32)),
        seq_balance_loss=(jnp.stack([s.seq_balance_loss for s in moe_stats]) if moe_stats
                          else jnp.zeros((0,), jnp.float32)),
    )


def _creation_context(mesh: jax.sharding.Mesh | None, rules) -> contextlib.AbstractContextManager:
  """Flax shards annotated variables eagerly; without a mesh that must be switched off."""
  if mesh is None:
    return nnx.use_eager_sharding(False)
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  if rules is not None:
    stack.enter_context(nnx.logical_axis_rules(rules))
  return stack


def create(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
           rules=None) -> DeepSeekV3:
  """A freshly initialised model (sharded by `rules` over `mesh` when given)."""
  with _creation_context(mesh, rules):
    return DeepSeekV3(cfg, nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> DeepSeekV3:
  """The model with `jax.ShapeDtypeStruct` leaves: shapes for free, even for 671B parameters."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(params=0)))


def apply(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
          positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> ModelOutput:
  """Pure forward pass over split state, for use inside `jax.jit` / `jax.grad`."""
  model = nnx.merge(graphdef, state)
  return model(tokens, positions, segment_ids)


# ---- the trainable tree: what the optimizer updates, split from the rest of the state -----

def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, nnx.State], nnx.State]:
  """model -> (graphdef, {'params': Param state, 'router_bias': RouterBias state}, rest)."""
  graphdef, params, router_bias, rest = nnx.split(model, nnx.Param, param.RouterBias, ...)
  return graphdef, {'params': params, 'router_bias': router_bias}, rest


def merge_trainable(graphdef: nnx.GraphDef, tree: dict[str, nnx.State],
                    rest: nnx.State) -> nnx.Module:
  """The inverse of `split_trainable`."""
  return nnx.merge(graphdef, tree['params'], tree['router_bias'], rest)

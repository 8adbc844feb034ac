"""DeepSeekMoE router (V3 eqs. 12-16) and the sequence-wise balance statistics (eqs. 17-20).

Scores are computed in float32. The aux-loss-free bias b_i is added only to choose experts
(eq. 16); the gates are the unbiased scores of the chosen experts. Group-limited routing follows
DeepSeek's reference inference code: a group's score is the sum of its top-2 biased scores (the
max score when there is no bias, as in V2), the best `topk_group` groups are kept and the rest are
masked with -inf before the top-K.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


class Routing(typing.NamedTuple):
  experts: jax.Array  # [T, K] int32, chosen expert ids
  gates: jax.Array    # [T, K] float32, weights of the chosen experts
  scores: jax.Array   # [T, E] float32, unbiased affinities s_{i,t}


def route(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
  """x [T, D], kernel [D, E] (the expert centroids e_i), bias [E] or None."""
  logits = jnp.einsum('TD,DE->TE', x.astype(jnp.float32), kernel.astype(jnp.float32))
  if cfg.scoring_func == 'sigmoid':
    scores = jax.nn.sigmoid(logits)
  else:
    scores = jax.nn.softmax(logits, axis=-1)
  choice = scores if bias is None else scores + bias[None, :]  # eq. 16: bias only picks experts
  if cfg.n_group > 1:
    choice = _limit_groups(choice, cfg, top2=bias is not None)
  _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
  gates = jnp.take_along_axis(scores, experts, axis=-1)
  if cfg.norm_topk_prob:
    gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
  return Routing(experts.astype(jnp.int32), gates * cfg.routed_scaling_factor, scores)


def _limit_groups(choice: jax.Array, cfg: ModelConfig, top2: bool) -> jax.Array:
  T, E, G = choice.shape[0], cfg.n_routed_experts, cfg.n_group
  grouped = choice.reshape(T, G, E // G)
  if top2:
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
  else:
    group_scores = jnp.max(grouped, axis=-1)
  _, keep = jax.lax.top_k(group_scores, cfg.topk_group)  # [T, M]
  kept = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], keep].set(True)
  return jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(T, E)


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
  """Tokens routed to each expert [E] (int32), counted over every (token, slot)."""
  return jnp.zeros((num_experts,), jnp.int32).at[experts.reshape(-1)].add(1)


def sequence_balance_loss(routing: Routing, batch: int, cfg: ModelConfig) -> jax.Array:
  """Eqs. 17-20 without alpha: mean over sequences of sum_i f_i P_i.

  f_i = E / (K T) * #{t : i in TopK_t},  P_i = 1/T * sum_t s_{i,t} / sum_j s_{j,t}.
  """
  E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
  T = routing.scores.shape[0] // batch
  chosen = jax.nn.one_hot(routing.experts, E, dtype=jnp.float32).sum(axis=1)  # [B*T, E]
  f = chosen.reshape(batch, T, E).sum(axis=1) * (E / (K * T))
  normed = routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)
  p = normed.reshape(batch, T, E).mean(axis=1)
  return jnp.mean(jnp.sum(f * p, axis=-1))

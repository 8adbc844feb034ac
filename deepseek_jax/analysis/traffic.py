"""Expert-parallel traffic accounting: the rows and bytes one step's routing decisions send over
each hop of `layers/expert_parallel.py`'s hierarchical dispatch (inter-node over 'expert', then
intra-node over 'plane'), against the naive one-copy-per-expert baseline. Pure accounting: it
runs no collective and is not on the model's hot path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.expert_parallel import buffer_rows


def traffic(experts, cfg: ModelConfig, X: int, Y: int, token_bytes: int, data: int = 1,
            origin_node=None, origin_plane=None) -> dict[str, jax.Array]:
  """Dispatch traffic of one step's routing decisions, experts [T, K] (all tokens, in batch
  order). Combine sends the same rows back (in the output dtype).

  A token's own node and plane are those of the device holding it: with the batch split over
  (data, expert, plane), token t sits on device t // (T / (data X Y)) in (data, expert, plane)
  order; pass `origin_node` / `origin_plane` [T] to override. Sends to one's own node (hop 1)
  or own plane (hop 2) stay on the device and are not counted. Routing metadata (K ids and
  gates per row) is not counted in the bytes.

  Returns counts of rows sent, bytes (float32: counts x token_bytes) and ratios:
    inter_node    hop 1: per token, distinct destination nodes other than its own;
    intra_node    hop 2: per (token, destination node), planes holding one of its experts other
                  than the plane it arrives on (its own plane: hop 1 stays inside one plane);
    naive_inter_node  the baseline: per token, chosen experts on another node;
    dedup_factor  naive_inter_node / inter_node;
  plus nodes_per_token (mean distinct nodes, own included) and the busiest device's (row,
  expert) pairs, max_expert_pairs, against the static worst case expert_pairs_bound (all of a
  device's tokens in one chunk).
  """
  experts = jnp.asarray(experts)
  T = experts.shape[0]
  E = cfg.n_routed_experts
  E_loc = E // (X * Y)
  shards = data * X * Y
  if T % shards:
    raise ValueError(f'traffic: T={T} tokens are not divisible by data x expert x plane = '
                     f'{data} x {X} x {Y} = {shards}')
  holder = jnp.arange(T) // (T // shards)           # the device holding each token
  origin_node = (holder // Y) % X if origin_node is None else jnp.asarray(origin_node)
  origin_plane = holder % Y if origin_plane is None else jnp.asarray(origin_plane)
  # Distinct destinations from the sorted device ids, O(T K): no [T, K, X, Y] one-hots.
  device = jnp.sort(experts // E_loc, axis=-1)      # [T, K], node-major: node * Y + plane
  node, plane = device // Y, device % Y
  new_device = jnp.concatenate([jnp.ones((T, 1), bool), device[:, 1:] != device[:, :-1]], -1)
  new_node = jnp.concatenate([jnp.ones((T, 1), bool), node[:, 1:] != node[:, :-1]], -1)
  distinct_nodes = jnp.sum(new_node, axis=-1)                                   # [T]
  inter = jnp.sum(distinct_nodes - jnp.any(node == origin_node[:, None], axis=-1))
  intra = jnp.sum(new_device & (plane != origin_plane[:, None]))
  naive = jnp.sum(node != origin_node[:, None])
  # Busiest device: (token, expert) pairs on it, per data replica (its own expert group).
  replica = holder // (X * Y)
  target = replica[:, None] * (X * Y) + experts // E_loc                        # [T, K]
  pairs = jnp.bincount(target.reshape(-1), length=shards)
  return dict(
      inter_node=inter, intra_node=intra, naive_inter_node=naive,
      inter_node_bytes=inter.astype(jnp.float32) * token_bytes,
      intra_node_bytes=intra.astype(jnp.float32) * token_bytes,
      naive_inter_node_bytes=naive.astype(jnp.float32) * token_bytes,
      dedup_factor=naive / jnp.maximum(inter, 1),
      nodes_per_token=jnp.mean(distinct_nodes.astype(jnp.float32)),
      max_expert_pairs=jnp.max(pairs),
      expert_pairs_bound=jnp.asarray(
          buffer_rows(cfg, X, Y, T // shards, T // shards)['expert_pairs'], jnp.int32))

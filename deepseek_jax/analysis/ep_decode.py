"""The expert-parallel decode speed limit (ISCA'25 "Insights into DeepSeek-V3", §2.3.2) and the
inter-node traffic that node-limited routing saves (§4.3).

§2.3.2: each device holds one expert and decodes `tokens_per_device` tokens; every token goes to
K routed + the shared experts. One EP step sends each token's hidden state out (dispatch, FP8)
and back (combine, BF16), bandwidth-bound and with no latency term:

    t_step = (dispatch + combine bytes) x tokens x experts per token x hidden / bandwidth
           = (1 + 2) x 32 x 9 x 7000 / 50 GB/s = 120.96 us

(the paper's "7K" hidden size is 7000; DeepSeek-V3's is 7168). With dual micro-batch overlap
and no compute time, a layer costs 2 steps, so TPOT = layers x 2 x t_step (61 layers: 14.76 ms,
67 tokens/s; at 900 GB/s, GB200 NVL72: 0.82 ms, ~1200 tokens/s).
"""

from __future__ import annotations

import dataclasses
import math

from deepseek_jax.config import ModelConfig

GB = 1e9  # the paper's GB/s are decimal


@dataclasses.dataclass(frozen=True)
class DecodeLimit:
  seconds_per_all_to_all: float  # one EP step: dispatch + combine
  tpot_seconds: float            # time per output token

  @property
  def us_per_all_to_all(self) -> float:
    return self.seconds_per_all_to_all * 1e6

  @property
  def tpot_ms(self) -> float:
    return self.tpot_seconds * 1e3

  @property
  def tokens_per_s(self) -> float:
    return 1.0 / self.tpot_seconds


def all_to_all_seconds(*, tokens_per_device: int, experts_per_token: int, hidden_size: int,
                       dispatch_bytes: float, combine_bytes: float,
                       bandwidth_bytes_per_s: float) -> float:
  """§2.3.2's communication time of one EP step (dispatch + combine)."""
  volume = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden_size
  return volume / bandwidth_bytes_per_s


def decode_limit(*, tokens_per_device: int = 32, experts_per_token: int = 9,
                 hidden_size: int = 7000, dispatch_bytes: float = 1, combine_bytes: float = 2,
                 bandwidth_bytes_per_s: float = 50 * GB, layers: int = 61,
                 all_to_alls_per_layer: int = 2) -> DecodeLimit:
  """Defaults are §2.3.2's: 32 tokens, 8 routed + 1 shared experts, "7K", FP8 / BF16, 50 GB/s
  (a 400 Gb/s CX7 NIC), 61 layers, 2 steps per layer (dual micro-batch overlap)."""
  step = all_to_all_seconds(tokens_per_device=tokens_per_device,
                            experts_per_token=experts_per_token, hidden_size=hidden_size,
                            dispatch_bytes=dispatch_bytes, combine_bytes=combine_bytes,
                            bandwidth_bytes_per_s=bandwidth_bytes_per_s)
  return DecodeLimit(step, layers * all_to_alls_per_layer * step)


def decode_limit_for_config(cfg: ModelConfig, **overrides) -> DecodeLimit:
  """The same model with experts per token, hidden size and layers read from a ModelConfig."""
  shapes = dict(experts_per_token=cfg.num_experts_per_tok + cfg.n_shared_experts,
                hidden_size=cfg.hidden_size, layers=cfg.num_layers)
  return decode_limit(**{**shapes, **overrides})


@dataclasses.dataclass(frozen=True)
class NodeTraffic:
  """Inter-node (IB) sends per token: a token crosses to a node once, then NVLink fans it out."""
  worst_unlimited: int      # K experts on K different nodes: K t (§4.3: "8t")
  worst_limited: int        # at most M nodes: M t
  expected_unlimited: float  # K experts uniformly at random, no node limit
  expected_limited: float    # uniformly at random inside M random nodes

  @property
  def saved_worst(self) -> float:
    return 1.0 - self.worst_limited / self.worst_unlimited

  @property
  def saved_expected(self) -> float:
    return 1.0 - self.expected_limited / self.expected_unlimited


def _expected_nodes(nodes: int, experts_per_node: int, k: int) -> float:
  """Distinct nodes hit by k distinct experts drawn uniformly from nodes x experts_per_node."""
  total, others = nodes * experts_per_node, (nodes - 1) * experts_per_node
  return nodes * (1.0 - math.comb(others, k) / math.comb(total, k))


def node_limited_traffic(*, experts_per_token: int = 8, nodes: int = 8, max_nodes: int = 4,
                         experts_per_node: int = 32) -> NodeTraffic:
  """§4.3: 256 experts in 8 groups of 32, one group per node, each token to at most 4 nodes."""
  k = experts_per_token
  return NodeTraffic(
      worst_unlimited=min(k, nodes),
      worst_limited=min(k, max_nodes),
      expected_unlimited=_expected_nodes(nodes, experts_per_node, k),
      expected_limited=_expected_nodes(max_nodes, experts_per_node, k),
  )


def node_limited_traffic_for_config(cfg: ModelConfig) -> NodeTraffic:
  """Groups = nodes (deepseek_jax/DESIGN.md, "Sharding and the multi-plane mesh"): G = n_group
  nodes, M = topk_group, E / G experts per node."""
  return node_limited_traffic(experts_per_token=cfg.num_experts_per_tok, nodes=cfg.n_group,
                              max_nodes=cfg.topk_group,
                              experts_per_node=cfg.n_routed_experts // cfg.n_group)

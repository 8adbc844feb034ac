"""Workloads as phases of NIC-to-NIC flows plus NVLink bytes, and their simulated time.

Intra-node traffic never enters the network: it crosses NVLink (§4.3: ~160 GB/s of H800's
200 GB/s). Cross-node traffic follows the two forwarding schemes the paper relies on:
- NCCL PXN (§5.1.1, §5.1.2): GPU (a, p) -> GPU (b, q) first crosses NVLink to GPU (a, q), then
  plane q's NICs; on MPFT it is the only way between planes (Fig. 3).
- DeepEP's dispatch (§4.3): a token crosses the network once per destination node, NIC (a, p) ->
  NIC (b, p), then NVLink fans it out to the GPUs of node b holding its experts; combine reverses it.

Aggregation (exact): flows between the same two NIC ports are merged into one (one ECMP hash per
NIC pair, as one connection carries a peer's traffic); flows between the same two leaves share a
route object. NVLink is a per-GPU resource pipelined with the network: a phase takes
max(network time, busiest GPU's NVLink bytes / NVLink rate) — an approximation that ignores the
coupling of the two hops (exact when one side is the clear bottleneck; the tables show both).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax.analysis.netsim import flows
from deepseek_jax.analysis.netsim.topology import NVLINK_BYTES_PER_S, Network


@dataclasses.dataclass
class Phase:
  src: np.ndarray         # [F] GPU owning the sending NIC
  dst: np.ndarray         # [F] GPU owning the receiving NIC
  nbytes: np.ndarray      # [F]
  nvlink_out: np.ndarray  # [G] bytes each GPU sends over NVLink
  nvlink_in: np.ndarray   # [G]
  job: np.ndarray | None = None  # [F] job id of each flow (two jobs sharing a cluster)

  def __add__(self, other: 'Phase') -> 'Phase':
    job = lambda p, j: p.job if p.job is not None else np.full(len(p.src), j)
    return Phase(*(np.concatenate([getattr(self, f), getattr(other, f)])
                   for f in ('src', 'dst', 'nbytes')),
                 self.nvlink_out + other.nvlink_out, self.nvlink_in + other.nvlink_in,
                 np.concatenate([job(self, 0), job(other, 1)]))


def gpus_of(net: Network, nodes) -> np.ndarray:
  nodes = np.asarray(nodes)
  return (nodes[:, None] * net.gpus_per_node + np.arange(net.gpus_per_node)).ravel()


def _merge(G: int, src, dst, nbytes):
  key, inv = np.unique(np.asarray(src) * G + np.asarray(dst), return_inverse=True)
  return key // G, key % G, np.bincount(inv, nbytes)


def from_matrix(net: Network, i: np.ndarray, j: np.ndarray, nbytes: np.ndarray,
                pxn: bool = True) -> Phase:
  """GPU i -> GPU j sends of nbytes (sparse lists) as NIC flows and NVLink bytes."""
  G, P = net.gpus, net.gpus_per_node
  i, j, nbytes = np.asarray(i), np.asarray(j), np.asarray(nbytes, float)
  keep = (i != j) & (nbytes > 0)
  i, j, nbytes = i[keep], j[keep], nbytes[keep]
  out, inn = np.zeros(G), np.zeros(G)
  local = i // P == j // P
  np.add.at(out, i[local], nbytes[local])
  np.add.at(inn, j[local], nbytes[local])
  i, j, nbytes = i[~local], j[~local], nbytes[~local]
  sender = (i // P) * P + j % P if pxn else i          # PXN: relay on the destination's rail
  relay = sender != i
  np.add.at(out, i[relay], nbytes[relay])
  np.add.at(inn, sender[relay], nbytes[relay])
  s, d, b = _merge(G, sender, j, nbytes)
  return Phase(s, d, b, out, inn)


def all_to_all(net: Network, nodes, bytes_per_pair: float, pxn: bool = True) -> Phase:
  """Every GPU of the job sends bytes_per_pair to every other GPU of the job."""
  g = gpus_of(net, nodes)
  i, j = np.repeat(g, len(g)), np.tile(g, len(g))
  return from_matrix(net, i, j, np.full(len(i), float(bytes_per_pair)), pxn)


def ring_step(net: Network, nodes, chunk_bytes: float) -> Phase:
  """One step of ring AllGather / ReduceScatter across nodes, one ring per rail (NCCL's
  rail-aligned rings): GPU (n_i, r) -> GPU (n_i+1, r) for every rail r."""
  nodes = np.asarray(nodes)
  P = net.gpus_per_node
  src = (nodes[:, None] * P + np.arange(P)).ravel()
  dst = (np.roll(nodes, -1)[:, None] * P + np.arange(P)).ravel()
  return from_matrix(net, src, dst, np.full(len(src), float(chunk_bytes)), pxn=False)


def v3_routing(tokens: int, rng: np.random.Generator, n_experts: int = 256, k: int = 8,
               n_group: int = 8, topk_group: int | None = 4, chunk: int = 1 << 15) -> np.ndarray:
  """Expert ids [tokens, k] drawn as V3 routes (report §2.1.2, ISCA'25 §4.3): k of n_experts,
  limited to topk_group of n_group groups (None: unlimited). Uniform: we have no published
  per-expert routing statistics, so every group and expert is equally likely."""
  per_group = n_experts // n_group
  out = []
  for start in range(0, tokens, chunk):
    n = min(chunk, tokens - start)
    if topk_group is None:
      out.append(np.argsort(rng.random((n, n_experts), np.float32), axis=1)[:, :k])
      continue
    groups = np.argsort(rng.random((n, n_group), np.float32), axis=1)[:, :topk_group]
    pick = np.argsort(rng.random((n, topk_group * per_group), np.float32), axis=1)[:, :k]
    out.append(groups[np.arange(n)[:, None], pick // per_group] * per_group + pick % per_group)
  return np.concatenate(out).astype(np.int64)


def ep_dispatch(net: Network, experts: np.ndarray, token_gpu: np.ndarray,
                expert_gpu: np.ndarray, token_bytes: float) -> Phase:
  """DeepEP's two-hop dispatch of tokens [T] (held by token_gpu) to experts [T, K]: one
  network send per (token, destination node), NIC (a, p) -> NIC (b, p); then per (token,
  node) one NVLink send to each other GPU of that node holding a chosen expert (on the own
  node, straight from the holder). The counts are `traffic`'s hop 1 and hop 2."""
  P, G = net.gpus_per_node, net.gpus
  dest = np.sort(expert_gpu[np.asarray(experts)], axis=1)                # [T, K]
  T, K = dest.shape
  holder = np.repeat(np.asarray(token_gpu), K).reshape(T, K)
  node, src_node = dest // P, holder // P
  new_gpu = np.concatenate([np.ones((T, 1), bool), dest[:, 1:] != dest[:, :-1]], 1)
  new_node = np.concatenate([np.ones((T, 1), bool), node[:, 1:] != node[:, :-1]], 1)
  hop1 = new_node & (node != src_node)
  arrive = node * P + holder % P                                         # same rail, node b
  s, d, b = _merge(G, holder[hop1], arrive[hop1], np.full(int(hop1.sum()), float(token_bytes)))
  hop2 = new_gpu & (dest != arrive)
  out = np.bincount(arrive[hop2], minlength=G) * float(token_bytes)
  inn = np.bincount(dest[hop2], minlength=G) * float(token_bytes)
  return Phase(s, d, b, out, inn)


def ep_combine(dispatch: Phase, token_bytes: float, dispatch_bytes: float) -> Phase:
  """Combine sends the dispatched rows back, reversed, in its own dtype."""
  x = token_bytes / dispatch_bytes
  return Phase(dispatch.dst, dispatch.src, dispatch.nbytes * x, dispatch.nvlink_in * x,
               dispatch.nvlink_out * x)


def model_traffic_counts(experts, cfg, nodes: int, planes: int) -> dict[str, int]:
  """The model's own accounting of the same routing (`traffic`: hop-1 and hop-2 rows), for
  checking `ep_dispatch` against it. Imported here, where it is needed: it pulls in JAX."""
  from deepseek_jax.analysis.traffic import traffic
  t = traffic(np.asarray(experts), cfg, nodes, planes, token_bytes=1)
  return dict(inter_node=int(t['inter_node']), intra_node=int(t['intra_node']))


@dataclasses.dataclass(frozen=True)
class Result:
  seconds: float          # max(network, NVLink)
  network_seconds: float
  nvlink_seconds: float
  flows: int
  rates: np.ndarray       # [F] max-min rates at the start of the phase (bytes/s)


def simulate(net: Network, phase: Phase, routing: str = 'adaptive', seed: int = 0,
             dynamic: bool = False, nvlink_bytes_per_s: float = NVLINK_BYTES_PER_S) -> Result:
  """A phase's time. dynamic=False: the slowest flow's bytes over its max-min rate (equal-size
  collectives); True: rates re-solved as flows finish (uneven EP traffic)."""
  r = flows.route(net, phase.src, phase.dst, routing, seed)
  if routing == 'adaptive':
    r = flows.rebalance(net, r, phase.nbytes)
  rates = flows.max_min(r)
  if not len(phase.src):
    network = 0.0
  elif dynamic:
    network = flows.completion_time(r, phase.nbytes)
  else:
    network = float(np.max(phase.nbytes / rates))
  nvlink = max(phase.nvlink_out.max(initial=0), phase.nvlink_in.max(initial=0)) / nvlink_bytes_per_s
  return Result(max(network, nvlink), network, nvlink, len(phase.src), rates)

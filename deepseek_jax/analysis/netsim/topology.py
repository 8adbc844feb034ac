"""Scale-out networks as graphs of directed links: FT2, the multi-plane fat-tree (MPFT), the
multi-rail fat-tree (MRFT) and FT3 (ISCA'25 "Insights into DeepSeek-V3", §5.1, Fig. 3, Table 3).

Plain numpy arrays, no graph library: every cable is two directed links (ids 2i, 2i+1, so a
link's reverse is `id ^ 1`), vertices carry a level (0 NIC port, 1 leaf/edge, 2 spine/aggregation,
3 core), and every network here is an up-down tree, so the shortest paths between two leaves are
the up-paths to their lowest common ancestors joined with the reversed up-paths of the other leaf.

GPU g sits on node g // gpus_per_node with rail (plane) g % gpus_per_node and owns one NIC port
(CX7: one 400 Gb/s port, §4.1). Builders take a node count, so any size up to the paper's is a
partial build of the same tree: leaves hold radix/2 NIC ports and send radix/2 uplinks; a partial
two-layer tree uses the fewest spines that take those uplinks, with parallel cables between a
leaf and a spine (the full-size build has radix/2 spines and single cables, Table 3's counts).
A partial FT3 keeps the whole core layer, (radix/2)^2 switches, however few pods it has.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

RADIX = 64                      # Table 3: 64-port 400G InfiniBand switches
NIC_BYTES_PER_S = 400e9 / 8     # §4.3: a 400 Gb/s CX7 port, 50 GB/s
NVLINK_BYTES_PER_S = 160e9      # §4.3: H800 NVLink 200 GB/s, "about 160GB/s can actually be achieved"
GPUS_PER_NODE = 8               # §5.1: eight GPUs and eight IB NICs per node


@dataclasses.dataclass(eq=False)
class Network:
  name: str
  gpus_per_node: int
  level: np.ndarray      # [V] 0 NIC port, 1 leaf, 2 spine / aggregation, 3 core
  tail: np.ndarray       # [L] directed links: tail -> head
  head: np.ndarray       # [L]
  capacity: np.ndarray   # [L] bytes / s (0 on a failed link)
  nic: np.ndarray        # [G] the NIC-port vertex of each GPU
  nic_up: np.ndarray     # [G] link NIC -> leaf
  nic_down: np.ndarray   # [G] link leaf -> NIC
  leaf: np.ndarray       # [G] the leaf each NIC hangs off
  _paths: dict = dataclasses.field(default_factory=dict, repr=False)
  _up: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def gpus(self) -> int:
    return len(self.nic)

  @property
  def node(self) -> np.ndarray:
    return np.arange(self.gpus) // self.gpus_per_node

  @property
  def rail(self) -> np.ndarray:
    return np.arange(self.gpus) % self.gpus_per_node

  @property
  def failed(self) -> np.ndarray:
    return self.capacity <= 0

  def counts(self) -> dict[str, int]:
    """Table 3's columns: NIC ports, switches, switch-to-switch cables."""
    switch_links = (self.level[self.tail] > 0) & (self.level[self.head] > 0)
    return dict(endpoints=self.gpus, switches=int(np.sum(self.level > 0)),
                links=int(np.sum(switch_links)) // 2)

  def up_links(self, v: int) -> np.ndarray:
    if not self._up:
      up = np.flatnonzero(self.level[self.head] > self.level[self.tail])
      order = np.argsort(self.tail[up], kind='stable')
      up = up[order]
      starts = np.searchsorted(self.tail[up], np.arange(len(self.level) + 1))
      self._up.update(links=up, starts=starts)
    s = self._up['starts']
    return self._up['links'][s[v]:s[v + 1]]

  def _up_paths(self, leaf: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per height h (h = 0: the leaf itself): (top vertex [n], links [n, h]) of every up-path."""
    key = ('up', leaf)
    if key not in self._paths:
      out = [(np.array([leaf]), np.zeros((1, 0), np.int64))]
      while True:
        tops, links = out[-1]
        ext = [(t, row, l) for t, row in zip(tops, links) for l in self.up_links(int(t))]
        if not ext:
          break
        out.append((np.array([self.head[l] for _, _, l in ext]),
                    np.array([list(row) + [l] for _, row, l in ext], np.int64)))
      self._paths[key] = out
    return self._paths[key]

  def paths(self, a: int, b: int) -> np.ndarray:
    """Shortest surviving up-down paths between leaves a != b: [P, hops] directed link ids."""
    key = (a, b)
    if key in self._paths:
      return self._paths[key]
    up_a, up_b = self._up_paths(a), self._up_paths(b)
    result = None
    for h in range(1, min(len(up_a), len(up_b))):
      (ta, la), (tb, lb) = up_a[h], up_b[h]
      common = np.intersect1d(ta, tb)
      rows = []
      for t in common:  # every up-path of a to t, then every up-path of b to t reversed
        pa, pb = la[ta == t], lb[tb == t][:, ::-1] ^ 1
        rows.append(np.concatenate([np.repeat(pa, len(pb), 0), np.tile(pb, (len(pa), 1))], 1))
      if rows:
        cand = np.concatenate(rows)
        cand = cand[~np.any(self.failed[cand], axis=1)]
        if len(cand):
          result = cand
          break
    if result is None:
      raise ValueError(f'{self.name}: no surviving path between leaves {a} and {b}')
    self._paths[key] = result
    return result

  def with_failures(self, links=(), switches=()) -> 'Network':
    """A copy with cables (either direction's id) and switches (all their cables) down."""
    cap = self.capacity.copy()
    for l in links:
      cap[[l, l ^ 1]] = 0
    for v in switches:
      cap[(self.tail == v) | (self.head == v)] = 0
    return dataclasses.replace(self, capacity=cap, _paths={}, _up={})

  def switch_links(self, lower: int = 1) -> np.ndarray:
    """Upward link ids of cables from level `lower` switches (one id per cable)."""
    return np.flatnonzero((self.level[self.tail] == lower) & (self.level[self.head] == lower + 1))


class _Builder:
  def __init__(self):
    self.level, self.tail, self.head, self.cap = [], [], [], []

  def vertex(self, level: int) -> int:
    self.level.append(level)
    return len(self.level) - 1

  def cable(self, lower: int, upper: int, cap: float, count: int = 1) -> int:
    for _ in range(count):
      self.tail += [lower, upper]
      self.head += [upper, lower]
      self.cap += [cap, cap]
    return len(self.tail) - 2 * count    # the first up link

  def attach(self, gpus, leaf_of, cap: float, nic, nic_up, leaf):
    for g, l in zip(gpus, leaf_of):
      nic[g] = self.vertex(0)
      nic_up[g] = self.cable(nic[g], l, cap)
      leaf[g] = l

  def network(self, name, gpus_per_node, nic, nic_up, leaf) -> Network:
    nic_up = np.asarray(nic_up)
    return Network(name, gpus_per_node, np.array(self.level), np.array(self.tail),
                   np.array(self.head), np.array(self.cap, float), np.asarray(nic), nic_up,
                   nic_up ^ 1, np.asarray(leaf))


def _spines(leaves: int, radix: int) -> tuple[int, int]:
  """Fewest spines taking every leaf's radix/2 uplinks, and the cables per leaf-spine pair."""
  half = radix // 2
  need = max(1, math.ceil(leaves * half / radix))
  spines = next(d for d in range(need, half + 1) if half % d == 0)
  return spines, half // spines


def _two_layer(b: _Builder, gpus: np.ndarray, radix: int, cap: float, nic, nic_up, leaf,
               leaves_per_group: int | None = None):
  """Leaves of radix/2 NIC ports over shared spines. gpus: a list of groups (rails) that each
  take their own leaves (MRFT), or one group (a plane of MPFT, or FT2)."""
  half = radix // 2
  leaf_ids = []
  for group in gpus:
    ids = [b.vertex(1) for _ in range(math.ceil(len(group) / half))]
    b.attach(group, [ids[i // half] for i in range(len(group))], cap, nic, nic_up, leaf)
    leaf_ids += ids
  if len(leaf_ids) > radix:
    raise ValueError(f'{len(leaf_ids)} leaves exceed a two-layer tree of radix {radix}')
  if len(leaf_ids) > 1:
    spines, parallel = _spines(len(leaf_ids), radix)
    spine_ids = [b.vertex(2) for _ in range(spines)]
    for l in leaf_ids:
      for s in spine_ids:
        b.cable(l, s, cap, parallel)


def _alloc(gpus: int):
  return [np.zeros(gpus, np.int64) for _ in range(3)]


def mpft(nodes: int, planes: int = GPUS_PER_NODE, radix: int = RADIX,
         nic_bytes_per_s: float = NIC_BYTES_PER_S) -> Network:
  """§5.1, Fig. 3: `planes` independent two-layer fat-trees; GPU i of every node on plane i."""
  G = nodes * planes
  nic, nic_up, leaf = _alloc(G)
  b = _Builder()
  for p in range(planes):
    _two_layer(b, [np.arange(p, G, planes)], radix, nic_bytes_per_s, nic, nic_up, leaf)
  return b.network(f'MPFT ({planes} planes)', planes, nic, nic_up, leaf)


def fat_tree_2(nodes: int, gpus_per_node: int = GPUS_PER_NODE, radix: int = RADIX,
               nic_bytes_per_s: float = NIC_BYTES_PER_S) -> Network:
  """One two-layer fat-tree, NICs attached in GPU order (a node's NICs share a leaf)."""
  G = nodes * gpus_per_node
  nic, nic_up, leaf = _alloc(G)
  b = _Builder()
  _two_layer(b, [np.arange(G)], radix, nic_bytes_per_s, nic, nic_up, leaf)
  return b.network('FT2', gpus_per_node, nic, nic_up, leaf)


def mrft(nodes: int, rails: int = GPUS_PER_NODE, radix: int = RADIX,
         nic_bytes_per_s: float = NIC_BYTES_PER_S) -> Network:
  """§5.1.2's single-plane multi-rail fat-tree: the same NICs, each rail on its own leaves (as
  NCCL's rail-optimized layout assumes), every leaf joined to one shared spine layer."""
  G = nodes * rails
  nic, nic_up, leaf = _alloc(G)
  b = _Builder()
  _two_layer(b, [np.arange(r, G, rails) for r in range(rails)], radix, nic_bytes_per_s,
             nic, nic_up, leaf)
  return b.network(f'MRFT ({rails} rails)', rails, nic, nic_up, leaf)


def fat_tree_3(nodes: int, gpus_per_node: int = GPUS_PER_NODE, radix: int = RADIX,
               nic_bytes_per_s: float = NIC_BYTES_PER_S) -> Network:
  """The k-ary three-layer fat-tree (Table 3's FT3): pods of k/2 edges fully joined to k/2
  aggregation switches; aggregation switch j of every pod joins cores j k/2 .. (j+1) k/2 - 1."""
  k, half = radix, radix // 2
  G = nodes * gpus_per_node
  nic, nic_up, leaf = _alloc(G)
  b = _Builder()
  edges = [b.vertex(1) for _ in range(math.ceil(G / half))]
  b.attach(np.arange(G), [edges[g // half] for g in range(G)], nic_bytes_per_s, nic, nic_up, leaf)
  pods = math.ceil(len(edges) / half)
  if pods > k:
    raise ValueError(f'{G} endpoints exceed FT3 of radix {k} ({k ** 3 // 4})')
  aggs = [[b.vertex(2) for _ in range(half)] for _ in range(pods)] if len(edges) > 1 else []
  for e, edge in enumerate(edges if aggs else []):
    for a in aggs[e // half]:
      b.cable(edge, a, nic_bytes_per_s)
  if pods > 1:
    cores = [b.vertex(3) for _ in range(half * half)]
    for pod in aggs:
      for j, a in enumerate(pod):
        for c in cores[j * half:(j + 1) * half]:
          b.cable(a, c, nic_bytes_per_s)
  return b.network('FT3', gpus_per_node, nic, nic_up, leaf)


def switches_on(net: Network, path: np.ndarray) -> int:
  """Switches a packet crosses on a NIC -> NIC path whose fabric part is `path`."""
  return len(path) + 1

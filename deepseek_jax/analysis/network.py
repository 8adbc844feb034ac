"""Scale-out network topologies built from one switch radix, and what they cost
(ISCA'25 "Insights into DeepSeek-V3", Table 3: 64-port 400G switches).

Counts: `endpoints` are NIC ports (one per GPU-NIC pair), `switches` are switches, `links` are
switch-to-switch cables; the endpoint-to-switch cables are one per endpoint and are counted
separately by the cost model (Table 3's "links" are switch-to-switch in every column: FT3 has
131,072 for 65,536 endpoints).

Cost model. Table 3 says its costs follow the Slim Fly paper's method (Besta & Hoefler, SC'14:
routers priced by radix, cables priced by kind and length over a physical layout) but publishes
neither prices nor layout. We keep that method's shape with two cable classes and no layout:

    cost = switches x $21,500 + switch-to-switch links x $2,400 + endpoints x $1,000

The prices are ours, a calibration and not vendor quotes: the switch price is set, the two cable
prices are the least-squares fit (in relative error) to Table 3's four distinct topologies (FT2,
FT3, SF, DF; MPFT is 8 x FT2), rounded. Every Table 3 cost is then within 1.3%. The fit is flat
(any switch price from $0 to $60k fits within ~1%), so it says little about real hardware.
"""

from __future__ import annotations

import dataclasses
import math

RADIX = 64  # Table 3: 64-port 400G InfiniBand switches


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  endpoints: int
  switches: int
  links: int      # switch-to-switch


@dataclasses.dataclass(frozen=True)
class CostModel:
  switch_usd: float = 21_500.0
  link_usd: float = 2_400.0           # switch-to-switch: optical cable and two transceivers
  endpoint_link_usd: float = 1_000.0  # NIC-to-leaf: a short cable, priced at the switch side

  def cost_usd(self, t: Topology) -> float:
    return (t.switches * self.switch_usd + t.links * self.link_usd
            + t.endpoints * self.endpoint_link_usd)

  def cost_per_endpoint_usd(self, t: Topology) -> float:
    return self.cost_usd(t) / t.endpoints


def fat_tree_2(radix: int = RADIX) -> Topology:
  """Leaf-spine: k leaves with k/2 endpoints and k/2 uplinks each, k/2 spines of k ports."""
  k = radix
  return Topology('FT2', endpoints=k * k // 2, switches=k + k // 2, links=k * k // 2)


def fat_tree_3(radix: int = RADIX) -> Topology:
  """The k-ary fat tree: k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 cores."""
  k = radix
  return Topology('FT3', endpoints=k ** 3 // 4, switches=5 * k * k // 4,
                  links=k ** 3 // 2)  # edge-aggregation k^3/4 + aggregation-core k^3/4


def multi_plane(tree: Topology, planes: int = 8) -> Topology:
  """Independent copies of one tree, one per GPU-NIC pair of a node (ISCA'25 §5.1, Fig. 3)."""
  return Topology(f'MPFT ({planes} x {tree.name})', endpoints=planes * tree.endpoints,
                  switches=planes * tree.switches, links=planes * tree.links)


def _is_prime_power(q: int) -> bool:
  p = next(d for d in range(2, q + 1) if q % d == 0)
  while q % p == 0:
    q //= p
  return q == 1


def slim_fly(radix: int = RADIX, prime_power: bool = False) -> Topology:
  """Slim Fly on the MMS graph of parameter q = 4w + delta (delta in {-1, 0, 1}): 2 q^2 routers,
  network radix k' = (3q - delta)/2, p = ceil(k'/2) endpoints per router; the largest q whose
  k' + p fits the radix. Table 3 takes q = 28 (not a prime power, so no MMS graph of that size
  exists); `prime_power=True` keeps to constructible q (27 for radix 64)."""
  best = None
  for q in range(3, radix + 1):
    delta = {0: 0, 1: 1, 3: -1}.get(q % 4)
    if delta is None or (prime_power and not _is_prime_power(q)):
      continue
    network_radix = (3 * q - delta) // 2
    per_router = math.ceil(network_radix / 2)
    if network_radix + per_router <= radix:
      best = (q, network_radix, per_router)
  q, network_radix, per_router = best
  routers = 2 * q * q
  return Topology(f'SF (q={q})', endpoints=routers * per_router, switches=routers,
                  links=routers * network_radix // 2)


def dragonfly(radix: int = RADIX, groups: int | None = None) -> Topology:
  """Canonical (balanced) Dragonfly (Kim et al., ISCA'08): p endpoints, a - 1 local and h global
  links per router with a = 2p = 2h, so 4p - 1 ports; groups of a routers fully connected.
  At most a h + 1 groups (one global link per group pair, the default); Table 3 uses 511.
  Links count every router port wired: routers x (a - 1 + h) / 2."""
  p = (radix + 1) // 4
  a, h = 2 * p, p
  g = a * h + 1 if groups is None else groups
  if not 2 <= g <= a * h + 1:
    raise ValueError(f'dragonfly groups={g}: must be in [2, a*h + 1 = {a * h + 1}]')
  routers = a * g
  return Topology(f'DF ({g} groups)', endpoints=p * routers, switches=routers,
                  links=routers * (a - 1 + h) // 2)

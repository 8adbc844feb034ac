"""Flow-level simulation: routing (ECMP, adaptive, static) and max-min fair rates by progressive
filling, then a collective phase's completion time as flows drain.

A flow is NIC port -> NIC port with a byte count. Its links are its two NIC cables plus, between
different leaves, one *route*: a set of fabric paths with weights summing to 1 (the fraction of
the flow's rate on each path). Flows between the same pair of leaves that route alike share one
route, which keeps the incidence small (V3's 2,048-GPU all-to-all is ~0.5M flows over a few
hundred routes).

- ECMP: a hash of (source NIC, destination NIC, seed) picks one shortest path (§5.2.2: RoCE's
  default; flows that "lack randomness ... converge on the same interconnect link").
- adaptive: the flow is split over all shortest paths, the fluid limit of packet spraying
  (§5.2.2, §6.3), starting even and then moving weight toward the paths whose busiest link is
  least loaded, keeping the best of a few rounds (never worse than the even split).
- static: destination-based tables, path = destination NIC index mod paths (the d-mod-k rule of
  fat-tree routing engines); §5.2.2: avoids conflicts "for specific destinations" only.

Rates are max-min fair (progressive filling): raise every unfrozen flow's rate together until a
link fills, freeze the flows crossing it, repeat. A phase ends when its last flow has drained;
rates are recomputed as flows finish (completion events within `tol` are merged).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax.analysis.netsim.topology import Network

ROUTINGS = ('ecmp', 'adaptive', 'static')


@dataclasses.dataclass
class Routed:
  capacity: np.ndarray      # [L]
  direct: np.ndarray        # [F, 2] the two NIC cables of each flow
  route: np.ndarray         # [F] route id, -1 inside one leaf
  path_route: np.ndarray    # [Q] route of each path
  weight: np.ndarray        # [Q] fraction of the route's rate on each path
  entry_path: np.ndarray    # [N] (path, link) incidence
  entry_link: np.ndarray    # [N]

  @property
  def flows(self) -> int:
    return len(self.route)

  @property
  def routes(self) -> int:
    return int(self.path_route.max()) + 1 if len(self.path_route) else 0

  def load(self, x: np.ndarray) -> np.ndarray:
    """Bytes/s on every link when flow f sends x[f]."""
    L = len(self.capacity)
    out = np.bincount(self.direct.ravel(), np.repeat(x, 2), minlength=L)
    inside = self.route >= 0
    per_route = np.bincount(self.route[inside], x[inside], minlength=self.routes)
    per_path = self.weight * per_route[self.path_route]
    return out + np.bincount(self.entry_link, per_path[self.entry_path], minlength=L)

  def touching(self, links: np.ndarray) -> np.ndarray:
    """Flows with rate on any of the boolean-marked links."""
    hit = links[self.direct].any(axis=1)
    if len(self.entry_link):
      on = links[self.entry_link] & (self.weight[self.entry_path] > 0)
      routes = np.zeros(self.routes, bool)
      routes[self.path_route[self.entry_path[on]]] = True
      hit |= (self.route >= 0) & routes[np.maximum(self.route, 0)]
    return hit


def _mix(*keys: np.ndarray) -> np.ndarray:
  """splitmix64 of the keys: a deterministic stand-in for a switch's flow hash."""
  h = np.zeros(np.broadcast(*keys).shape, np.uint64)
  with np.errstate(over='ignore'):
    for k in keys:
      h = (h ^ np.asarray(k).astype(np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
      h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      h = h ^ (h >> np.uint64(31))
  return h


def _static_pick(net: Network, pair_paths, flow_pair, dst) -> np.ndarray:
  """d-mod-k: the destination's position j under its leaf picks, from every source leaf, the
  path leaving on the source leaf's j-th uplink and arriving on the destination leaf's j-th
  downlink (mod their counts), so a leaf's destinations never share a downlink."""
  half = np.bincount(net.leaf).max()
  pos = np.zeros(net.gpus, np.int64)
  order = np.argsort(net.leaf, kind='stable')
  pos[order] = np.arange(net.gpus) - np.searchsorted(net.leaf[order], net.leaf[order])
  rank = np.zeros(len(net.tail), np.int64)
  for v in np.unique(net.tail[net.level[net.head] > net.level[net.tail]]):
    ups = net.up_links(int(v))
    rank[ups] = np.arange(len(ups))
  table = []
  for paths in pair_paths:
    up, down = rank[paths[:, 0]], rank[paths[:, -1] ^ 1]
    n_up, n_down = up.max() + 1, down.max() + 1
    row = []
    for j in range(half):
      hit = np.flatnonzero((up == j % n_up) & (down == j % n_down))
      hit = hit if len(hit) else np.flatnonzero(down == j % n_down)
      row.append(hit[0] if len(hit) else j % len(paths))
    table.append(row)
  table = np.array(table + [[0] * half])
  return table[flow_pair, pos[dst]].astype(np.uint64)


def route(net: Network, src: np.ndarray, dst: np.ndarray, routing: str = 'adaptive',
          seed: int = 0) -> Routed:
  """Routes NIC-to-NIC flows (GPU ids of the NICs' owners) on `net`."""
  if routing not in ROUTINGS:
    raise ValueError(f'routing={routing!r}: must be one of {ROUTINGS}')
  src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
  if np.any(net.capacity[net.nic_up[src]] <= 0) or np.any(net.capacity[net.nic_down[dst]] <= 0):
    raise ValueError(f'{net.name}: a flow starts or ends on a failed NIC cable')
  la, lb = net.leaf[src], net.leaf[dst]
  cross = la != lb
  V = len(net.level)
  pair_key, flow_pair_cross = np.unique(la[cross] * V + lb[cross], return_inverse=True)
  pair_paths = [net.paths(int(k // V), int(k % V)) for k in pair_key]
  flow_pair = np.full(len(src), -1)
  flow_pair[cross] = flow_pair_cross
  n_paths = np.array([len(p) for p in pair_paths] + [1])
  if routing == 'adaptive':
    key = flow_pair                                      # one route per leaf pair, all paths
  else:
    if routing == 'ecmp':
      pick = _mix(src, dst, np.full_like(src, seed)) % n_paths[flow_pair].astype(np.uint64)
    else:
      pick = _static_pick(net, pair_paths, flow_pair, dst)
    key = np.where(cross, flow_pair * int(n_paths.max()) + pick.astype(np.int64), -1)
  uniq, inverse = np.unique(key[cross], return_inverse=True)
  route_of = np.full(len(src), -1)
  route_of[cross] = inverse
  M = 1 if routing == 'adaptive' else int(n_paths.max())
  path_route, weight, entry_path, entry_link = [], [], [], []
  q = 0
  bounds = np.searchsorted(uniq // M, np.arange(len(pair_paths) + 1))
  for p, paths in enumerate(pair_paths):   # routes of one leaf pair, in route-id order
    ids = np.arange(bounds[p], bounds[p + 1])
    if not len(ids):
      continue
    if routing == 'adaptive':
      chosen, per = paths, len(paths)        # one route: every path, even split
    else:
      chosen, per = paths[uniq[ids] % M], 1  # one route per used path
    n, hops = chosen.shape
    path_route.append(np.repeat(ids, per))
    weight.append(np.full(n, 1.0 / per))
    entry_path.append(np.repeat(np.arange(q, q + n), hops))
    entry_link.append(chosen.ravel())
    q += n
  cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
  return Routed(net.capacity.astype(float), np.stack([net.nic_up[src], net.nic_down[dst]], 1),
                route_of, cat(path_route, np.int64), cat(weight, float),
                cat(entry_path, np.int64), cat(entry_link, np.int64))


def _csr(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  order = np.argsort(keys, kind='stable')
  return order, np.searchsorted(keys[order], np.arange(n + 1))


def max_min(r: Routed, active: np.ndarray | None = None, rel_tol: float = 1e-9) -> np.ndarray:
  """Max-min fair rates (bytes/s) of the active flows by progressive filling (water-filling):
  every unfrozen flow holds the same level; the link whose spare capacity over its unfrozen
  load coefficient is smallest fills next and freezes its flows at that level. Loads update
  only for the flows just frozen, so the work is one pass over the incidence plus a pass over
  the links per filling level."""
  F, L, R = r.flows, len(r.capacity), r.routes
  active = np.ones(F, bool) if active is None else np.asarray(active, bool)
  rate = np.zeros(F)
  frozen = ~active
  direct = r.direct.ravel()
  d_order, d_start = _csr(direct, L)
  # route -> link coefficients: the sum of its paths' weights through each link
  rl = r.path_route[r.entry_path] * L + r.entry_link
  keys, inv = np.unique(rl, return_inverse=True)
  e_coef = np.bincount(inv, r.weight[r.entry_path])
  e_route, e_link = keys // L, keys % L
  keep = e_coef > 0
  e_coef, e_route, e_link = e_coef[keep], e_route[keep], e_link[keep]
  e_order, e_start = _csr(e_link, L)
  r_order, r_start = _csr(e_route, R)
  inside = r.route >= 0
  f_order, f_start = _csr(np.where(inside, r.route, R), R + 1)
  route_active = np.bincount(r.route[inside & active], minlength=R).astype(float)
  coef = (np.bincount(direct, np.repeat(active, 2).astype(float), minlength=L)
          + np.bincount(e_link, e_coef * route_active[e_route], minlength=L))
  spare = r.capacity.astype(float).copy()
  while not frozen.all():
    live = coef > 1e-12
    if not live.any():
      raise ValueError('active flows cross no link')
    level = np.full(L, np.inf)
    level[live] = spare[live] / coef[live]
    lam = level.min()
    full = np.flatnonzero(level <= lam * (1 + rel_tol) + 1e-300)
    cand = [d_order[d_start[l]:d_start[l + 1]] // 2 for l in full]
    routes = np.unique(np.concatenate([e_route[e_order[e_start[l]:e_start[l + 1]]]
                                       for l in full] + [np.zeros(0, np.int64)]))
    cand += [f_order[f_start[q]:f_start[q + 1]] for q in routes]
    newly = np.unique(np.concatenate(cand))
    newly = newly[~frozen[newly]]
    if not len(newly):
      raise RuntimeError('progressive filling stalled')
    frozen[newly] = True
    rate[newly] = lam
    # the newly frozen flows stop growing: their load at `lam` leaves the spare capacity
    spare -= lam * coef
    np.subtract.at(coef, r.direct[newly].ravel(), 1.0)
    fr = r.route[newly]
    q, n = np.unique(fr[fr >= 0], return_counts=True)
    if len(q):
      idx = np.concatenate([r_order[r_start[x]:r_start[x + 1]] for x in q])
      np.subtract.at(coef, e_link[idx], e_coef[idx] * np.repeat(n, r_start[q + 1] - r_start[q]))
    spare += lam * coef
  return rate


def rebalance(net: Network, r: Routed, nbytes: np.ndarray, rounds: int = 3,
              step: float = 4.0) -> Routed:
  """Adaptive routing's load feedback: shift each route's weight toward paths whose busiest
  link is least utilized, keep the weights with the shortest static completion time."""
  def score(rr):
    rate = max_min(rr)
    return np.max(np.where(nbytes > 0, nbytes / np.maximum(rate, 1e-30), 0.0)), rate
  best, (best_t, rate) = r, score(r)
  cur = r
  for _ in range(rounds):
    if not len(cur.entry_link):
      break
    util = cur.load(rate) / np.maximum(cur.capacity, 1e-30)
    path_util = np.zeros(len(cur.weight))
    np.maximum.at(path_util, cur.entry_path, util[cur.entry_link])
    low = np.full(cur.routes, np.inf)
    np.minimum.at(low, cur.path_route, path_util)
    if np.all(path_util - low[cur.path_route] < 1e-9):  # already even: nothing to shift
      break
    w = cur.weight * np.exp(-step * (path_util - low[cur.path_route]))
    w /= np.bincount(cur.path_route, w)[cur.path_route]
    cur = dataclasses.replace(cur, weight=w)
    t, rate = score(cur)
    if t < best_t * (1 - 1e-6):
      best, best_t = cur, t
  return best


def completion_time(r: Routed, nbytes: np.ndarray, tol: float = 0.02,
                    max_events: int = 200) -> float:
  """Seconds until every flow has sent its bytes, rates re-solved as flows finish. Flows that
  would finish within (1 + tol) of the next finisher finish with it (a bounded overestimate);
  after max_events the rest drain at their last rates."""
  left = np.asarray(nbytes, float).copy()
  active = left > 0
  t = 0.0
  for _ in range(max_events):
    if not active.any():
      return t
    rate = max_min(r, active)
    if np.any(rate[active] <= 0):
      raise ValueError('a flow has no capacity')
    times = np.where(active, left / np.where(active, rate, 1.0), np.inf)
    dt = times.min() * (1 + tol)
    done = active & (times <= dt)
    dt = times[done].max()
    left = np.where(active, left - rate * dt, left)
    active &= ~done
    t += dt
  if active.any():
    rate = max_min(r, active)
    t += np.max(left[active] / rate[active])
  return t


def static_completion_time(r: Routed, nbytes: np.ndarray) -> float:
  """The issue's one-shot definition: the slowest flow's bytes over its max-min rate."""
  rate = max_min(r, np.asarray(nbytes) > 0)
  return float(np.max(np.where(nbytes > 0, nbytes / np.maximum(rate, 1e-30), 0.0)))

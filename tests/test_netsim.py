"""The network simulator against answers worked out by hand, Table 3's counts (through
analysis/network.py), the model's own traffic accounting, and max-min fairness's definition."""

import numpy as np
import pytest

from deepseek_jax.analysis import network
from deepseek_jax.analysis.netsim import flows, report, topology, workloads

NIC = topology.NIC_BYTES_PER_S


def _counts(t: network.Topology) -> dict:
  return dict(endpoints=t.endpoints, switches=t.switches, links=t.links)


def test_full_size_counts_equal_table_3():
  ft2 = network.fat_tree_2()
  assert topology.fat_tree_2(2048 // 8).counts() == _counts(ft2)
  assert topology.mpft(16384 // 8).counts() == _counts(network.multi_plane(ft2, 8))
  assert topology.fat_tree_3(65536 // 8).counts() == _counts(network.fat_tree_3())
  # MRFT of V3's 2,048 GPUs is one FT2 with rail-aligned leaves
  assert topology.mrft(256).counts() == _counts(ft2)


def test_shortest_path_sets():
  ft3 = topology.fat_tree_3(65536 // 8)
  edge = lambda g: int(ft3.leaf[g])
  assert ft3.paths(edge(0), edge(32)).shape == (32, 2)        # same pod: k/2 aggregations
  assert ft3.paths(edge(0), edge(65535)).shape == (1024, 4)   # cross pod: (k/2)^2 cores
  mp = topology.mpft(2048)
  assert mp.paths(int(mp.leaf[0]), int(mp.leaf[8 * 2047])).shape == (32, 2)
  with pytest.raises(ValueError, match='no surviving path'):  # planes never meet (Fig. 3)
    mp.paths(int(mp.leaf[0]), int(mp.leaf[8 * 2047 + 1]))


def test_max_min_by_hand():
  """Same leaf, so only NIC cables count. Flows a, b, e into NIC 3; b and c out of NIC 1:
  NIC 3 fills first at 50/3 each, then c takes what b leaves on NIC 1: 50 - 50/3."""
  net = topology.fat_tree_2(1, gpus_per_node=8)
  r = flows.route(net, src=[0, 1, 1, 2], dst=[3, 3, 4, 3])
  rate = flows.max_min(r) / NIC
  np.testing.assert_allclose(rate, [1 / 3, 1 / 3, 2 / 3, 1 / 3], rtol=1e-12)


@pytest.mark.parametrize('n', [1, 2, 7])
def test_one_bottleneck_shared_by_n_flows(n):
  net = topology.fat_tree_2(2, gpus_per_node=8)
  rate = flows.max_min(flows.route(net, src=np.arange(1, n + 1), dst=np.zeros(n, int)))
  np.testing.assert_allclose(rate, NIC / n, rtol=1e-12)


def test_full_bisection_adaptive_gives_every_nic_its_rate():
  net = topology.mpft(64, radix=16)    # 8 leaves per plane, 4 spines x 2 cables
  phase = workloads.all_to_all(net, np.arange(64), 1e6)
  r = flows.route(net, phase.src, phase.dst, 'adaptive')
  per_nic = np.bincount(phase.src, flows.max_min(r), minlength=net.gpus)
  np.testing.assert_allclose(per_nic, NIC, rtol=1e-9)
  # ECMP hashes collide on some uplinks: never better than adaptive
  ecmp = workloads.simulate(net, phase, 'ecmp', seed=0).seconds
  assert ecmp >= workloads.simulate(net, phase, 'adaptive').seconds * (1 - 1e-9)


def test_perfect_ecmp_collision_halves_both_flows():
  net = topology.mpft(64, radix=16)
  leaf = net.leaf
  src = [g for g in range(0, 64 * 8, 8) if leaf[g] == leaf[0]]
  dst = [g for g in range(0, 64 * 8, 8) if leaf[g] != leaf[0]]
  cand_s, cand_d = np.repeat(src, len(dst)), np.tile(dst, len(src))
  r = flows.route(net, cand_s, cand_d, 'ecmp', seed=3)
  first = r.entry_link[r.entry_path == np.flatnonzero(r.path_route == r.route[0])[0]][0]
  same = [i for i in range(len(cand_s)) if cand_s[i] != cand_s[0] and cand_d[i] != cand_d[0]
          and first in r.entry_link[np.isin(r.entry_path, np.flatnonzero(r.path_route ==
                                                                          r.route[i]))]]
  pair_s, pair_d = cand_s[[0, same[0]]], cand_d[[0, same[0]]]
  ecmp = flows.max_min(flows.route(net, pair_s, pair_d, 'ecmp', seed=3))
  np.testing.assert_allclose(ecmp, NIC / 2, rtol=1e-12)       # one uplink, two flows
  adaptive = flows.max_min(flows.route(net, pair_s, pair_d, 'adaptive'))
  np.testing.assert_allclose(adaptive, NIC, rtol=1e-12)        # sprayed over 8 uplinks


def test_max_min_properties_and_seeded_determinism():
  net = topology.mpft(64, radix=16)
  rng = np.random.default_rng(0)
  src = rng.integers(0, 64, 400) * 8
  dst = rng.integers(0, 64, 400) * 8
  keep = src != dst
  src, dst = src[keep], dst[keep]
  r = flows.route(net, src, dst, 'ecmp', seed=1)
  rate = flows.max_min(r)
  load = r.load(rate)
  assert np.all(load <= r.capacity * (1 + 1e-9))               # no link over capacity
  full = load >= r.capacity * (1 - 1e-9)
  for f in range(len(src)):                                    # each flow has a bottleneck:
    links = set(r.direct[f]) | set(r.entry_link[np.isin(r.entry_path, np.flatnonzero(
        r.path_route == r.route[f]))]) if r.route[f] >= 0 else set(r.direct[f])
    on = lambda l: [g for g in range(len(src)) if l in r.direct[g] or (r.route[g] >= 0 and l in
                    r.entry_link[np.isin(r.entry_path, np.flatnonzero(r.path_route == r.route[g]))])]
    assert any(full[l] and rate[f] >= max(rate[on(l)]) * (1 - 1e-9) for l in links)
    if f == 20:
      break
  np.testing.assert_array_equal(rate, flows.max_min(flows.route(net, src, dst, 'ecmp', seed=1)))
  other = flows.route(net, src, dst, 'ecmp', seed=2)
  assert not np.array_equal(r.entry_link[np.argsort(r.entry_path)],
                            other.entry_link[np.argsort(other.entry_path)]) or \
      not np.array_equal(rate, flows.max_min(other))


def test_spine_failure_slowdown_by_hand():
  """One of a plane's 4 spines down: each leaf keeps 6 of 8 uplinks for 8 NICs x 56 cross-leaf
  flows, so those flows get 6 x 50 / 448 against 50 / 63 before: 448 / 378 slower."""
  net = topology.mpft(64, radix=16)
  phase = workloads.all_to_all(net, np.arange(64), 1e6)
  base = workloads.simulate(net, phase, 'adaptive').network_seconds
  spine = int(np.flatnonzero(net.level == 2)[0])
  hit = workloads.simulate(net.with_failures(switches=[spine]), phase, 'adaptive')
  np.testing.assert_allclose(hit.network_seconds / base, 448 / 378, rtol=1e-6)


def test_ep_dispatch_matches_model_traffic_accounting():
  from experiments.configs import deepseek_v3
  from deepseek_jax.config import ModelConfig
  cfg = ModelConfig.from_dict(deepseek_v3.get_config().model.to_dict())
  nodes, per_gpu = 8, 32
  net = topology.mpft(nodes)
  experts = workloads.v3_routing(nodes * 8 * per_gpu, np.random.default_rng(0))
  d = workloads.ep_dispatch(net, experts, np.repeat(np.arange(nodes * 8), per_gpu),
                            np.arange(256) // (256 // (nodes * 8)), token_bytes=1)
  counts = workloads.model_traffic_counts(experts, cfg, nodes, 8)
  assert d.nbytes.sum() == counts['inter_node']                # hop 1, over IB
  assert d.nvlink_out.sum() == d.nvlink_in.sum() == counts['intra_node']   # hop 2, NVLink
  assert np.all(d.src % 8 == d.dst % 8)                        # IB stays inside one plane
  # node-limited: 8 groups = 8 nodes, at most 4 per token
  assert np.max([len(np.unique(e // 32)) for e in experts]) == 4


def test_latency_fit_reproduces_table_5():
  rows = {r['path']: r for r in report.latency_rows()}
  same, cross = rows['same leaf (MPFT plane, FT2)'], rows['cross leaf (MPFT plane, FT2)']
  assert (same['switches'], cross['switches']) == (1, 3)
  assert same['ib_us'] == pytest.approx(2.8) and cross['ib_us'] == pytest.approx(3.7)
  assert same['roce_us'] == pytest.approx(3.6) and cross['roce_us'] == pytest.approx(5.6)
  assert rows['FT3: cross pod']['switches'] == 5


def test_report_adaptive_never_below_ecmp_and_mpft_matches_mrft():
  rows = report.collective_rows(seed=0)
  for topo in ('MPFT', 'MRFT'):
    for order in ('node id', 'random'):
      bw = {r['routing']: r['busbw_gb_s'] for r in rows
            if (r['topology'], r['ring_order']) == (topo, order)}
      assert bw['adaptive'] >= max(bw['ecmp'], bw['static']) * (1 - 1e-9)
      assert bw['adaptive'] == pytest.approx(NIC / 1e9)        # every ring hop at NIC rate
  a2a = report.all_to_all_rows(seed=0, sizes=(64,), routings=('adaptive',))
  mpft, mrft = (next(r for r in a2a if r['topology'] == t) for t in ('MPFT', 'MRFT'))
  assert mpft['nic_gb_s'] == pytest.approx(mrft['nic_gb_s']) == pytest.approx(NIC / 1e9)

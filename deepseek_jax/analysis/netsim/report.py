"""The simulator's figures as tables next to the ISCA'25 paper's (arXiv 2505.09343): all-to-all
on MPFT vs MRFT (§5.1.2, Fig. 5), DeepEP dispatch / combine (§4.2, §5.1.2, Fig. 7), AllGather /
ReduceScatter by routing (§5.2.2, Fig. 8), isolation and robustness (§5.1.1), latency (Table 5).

Every experiment runs on V3's cluster size, 256 nodes x 8 GPUs (§5.1: "just over two thousand
GPUs"), built as a partial tree of 64-port switches; smaller jobs take nodes at random (seeded).
"""

from __future__ import annotations

import json
import time

import numpy as np

from deepseek_jax.analysis import ep_decode
from deepseek_jax.analysis.netsim import topology, workloads

NODES = 256
GB = 1e9
MIB = 1 << 20
BUILDERS = {'MPFT': topology.mpft, 'MRFT': topology.mrft, 'FT3': topology.fat_tree_3}
PXN = {'MPFT': True, 'MRFT': True, 'FT3': False}   # FT3 is not rail-aligned: NIC to NIC


def _job(seed: int, nodes: int) -> np.ndarray:
  return np.sort(np.random.default_rng(seed).permutation(NODES)[:nodes])


def all_to_all_rows(seed: int = 0, sizes=(32, 64, 128, 2048), topologies=('MPFT', 'MRFT'),
                    routings=('ecmp', 'adaptive')) -> list[dict]:
  rows = []
  for name in topologies:
    net = BUILDERS[name](NODES)
    for gpus in sizes:
      nodes = _job(seed, gpus // 8)
      phase = workloads.all_to_all(net, nodes, MIB, PXN[name])
      for routing in routings:
        start = time.perf_counter()
        res = workloads.simulate(net, phase, routing, seed)
        rows.append(dict(topology=name, gpus=gpus, routing=routing,
                         gb_s_per_gpu=(gpus - 1) * MIB / res.seconds / GB,
                         nic_gb_s=8 * (gpus // 8 - 1) * MIB / res.network_seconds / GB
                         if gpus > 8 else None,
                         flows=res.flows, sim_seconds=time.perf_counter() - start))
  return rows


def ep_rows(seed: int = 0, ep_sizes=(16, 32, 64, 128), tokens_per_gpu: int = 4096,
            hidden: int = 7168, routing: str = 'adaptive') -> list[dict]:
  """DeepEP's normal kernels at V3's shapes: 4,096 tokens per GPU, FP8 dispatch (1 B per
  element), BF16 combine (2 B), 256 experts over the EP group, top-8."""
  net = topology.mpft(NODES)
  analytic = ep_decode.all_to_all_seconds(
      tokens_per_device=tokens_per_gpu, experts_per_token=9, hidden_size=hidden,
      dispatch_bytes=1, combine_bytes=2, bandwidth_bytes_per_s=50 * GB)
  rows = []
  for gpus in ep_sizes:
    for limit in (4, None):
      rng = np.random.default_rng(seed)
      experts = workloads.v3_routing(gpus * tokens_per_gpu, rng, topk_group=limit)
      token_gpu = np.repeat(np.arange(gpus), tokens_per_gpu)
      expert_gpu = np.arange(256) // (256 // gpus)
      d = workloads.ep_dispatch(net, experts, token_gpu, expert_gpu, hidden * 1)
      c = workloads.ep_combine(d, hidden * 2, hidden * 1)
      rd = workloads.simulate(net, d, routing, seed, dynamic=True)
      rc = workloads.simulate(net, c, routing, seed, dynamic=True)
      rdma = np.bincount(d.src, d.nbytes, minlength=gpus)[:gpus]
      sends = d.nbytes.sum() / hidden / len(experts)        # network sends per token (§4.3)
      nodes = np.array([len(np.unique(e // (256 // (gpus // 8)))) for e in experts[:4096]])
      rows.append(dict(
          ep_gpus=gpus, routing='node-limited (4 of 8 groups)' if limit else 'unlimited',
          nodes_per_token=float(nodes.mean()), ib_sends_per_token=float(sends),
          dispatch_gb_s=float(rdma.mean() / rd.seconds / GB),
          combine_gb_s=float(2 * rdma.mean() / rc.seconds / GB),
          dispatch_us=float(rd.seconds * 1e6), combine_us=float(rc.seconds * 1e6),
          bound='NVLink' if rd.nvlink_seconds >= rd.network_seconds else 'network',
          analytic_dedup_us=float(3 * tokens_per_gpu * sends * hidden / (50 * GB) * 1e6),
          analytic_us=analytic * 1e6, published_gb_s='>40'))
  return rows


def collective_rows(seed: int = 0, nodes: int = NODES, topologies=('MPFT', 'MRFT')) -> list[dict]:
  """Ring AllGather / ReduceScatter (the same flows in a fluid model: reduction is free), one
  ring per rail over the job's nodes; bus bandwidth = chunk / step time. Rings in node-id order
  (topology-aware: neighbours share a leaf) or in a random rank order (most hops cross leaves,
  the "lack of randomness" of §5.2.2 meeting ECMP's hash)."""
  rows = []
  job = _job(seed, nodes)
  orders = {'node id': job, 'random': np.random.default_rng(seed + 2).permutation(job)}
  for name in topologies:
    net = BUILDERS[name](NODES)
    for order, ring in orders.items():
      phase = workloads.ring_step(net, ring, MIB)
      for routing in ('ecmp', 'adaptive', 'static'):
        res = workloads.simulate(net, phase, routing, seed)
        rows.append(dict(topology=name, gpus=8 * nodes, ring_order=order, routing=routing,
                         busbw_gb_s=MIB / res.seconds / GB))
  return rows


def isolation_rows(seed: int = 0, nodes: int = 64, routings=('ecmp', 'adaptive')) -> list[dict]:
  """Job A: a ring AllGather step over `nodes` random nodes (in node-id order), one 50 GB/s
  flow per NIC, the kind of flow a neighbour can slow. Job B: as many other nodes whose rail-0
  NICs each stream to the next B node in a random order: on MPFT it can only load plane 0; on
  MRFT and FT3 it goes NIC to NIC to a random rail, through the shared spine / core."""
  perm = np.random.default_rng(seed + 1).permutation(NODES)
  a, b = np.sort(perm[:nodes]), perm[nodes:2 * nodes]
  rng = np.random.default_rng(seed + 3)
  rows = []
  for name in ('MPFT', 'MRFT', 'FT3'):
    net = BUILDERS[name](NODES)
    job_a = workloads.ring_step(net, a, MIB)
    rail = 0 if name == 'MPFT' else rng.integers(0, 8, len(b))
    job_b = workloads.from_matrix(net, b * 8, np.roll(b, -1) * 8 + rail,
                                  np.full(len(b), 1e12), pxn=False)
    mine = (job_a + job_b).job == 0
    for routing in routings:
      alone = workloads.simulate(net, job_a, routing, seed)
      both = workloads.simulate(net, job_a + job_b, routing, seed)
      t_both = float(np.max(job_a.nbytes / both.rates[mine]))
      slowed = both.rates[mine] < alone.rates * (1 - 1e-6)
      rows.append(dict(topology=name, routing=routing,
                       a_busbw_alone=MIB / alone.network_seconds / GB,
                       a_busbw_shared=MIB / t_both / GB,
                       slowdown=t_both / alone.network_seconds,
                       a_flows_slowed_pct=100 * float(slowed.mean()),
                       a_rails_touched=int(len(np.unique(job_a.src[slowed] % 8)))))
  return rows


def robustness_rows(seed: int = 0, routings=('ecmp', 'adaptive'), cables=(8,)) -> list[dict]:
  rows = []
  for name in ('MPFT', 'MRFT'):
    base_net = BUILDERS[name](NODES)
    phase = workloads.all_to_all(base_net, np.arange(NODES), MIB, True)
    fabric = base_net.switch_links(1)
    spine = int(np.flatnonzero(base_net.level == 2)[0])
    cases = [('none', base_net)]
    for k in cables:
      cut = np.random.default_rng(seed).choice(fabric, k, replace=False)
      cases.append((f'{k} leaf-spine cables', base_net.with_failures(links=cut)))
    cases.append(('1 spine switch', base_net.with_failures(switches=[spine])))
    for routing in routings:
      base = None
      for case, net in cases:
        res = workloads.simulate(net, phase, routing, seed)
        base = base or res.seconds
        rows.append(dict(topology=name, failure=case, routing=routing,
                         gb_s_per_gpu=2047 * MIB / res.seconds / GB,
                         slowdown=res.seconds / base))
  return rows


# Table 5: CPU-side end-to-end latency of a 64 B transfer (µs).
TABLE5 = {'InfiniBand': (2.8, 3.7), 'RoCE': (3.6, 5.6), 'NVLink': 3.33}


def latency_rows() -> list[dict]:
  """Latency = base + per-switch x switches, the two constants fit to Table 5's same-leaf (1
  switch) and cross-leaf (3 switches) figures for each link layer; more switches extrapolate.
  Cross-plane on MPFT adds the forwarding GPU's NVLink hop, Table 5's whole NVLink figure (an
  upper bound: it includes the host-side cost once more)."""
  fit = {k: ((c - s) / 2, s - (c - s) / 2) for k, (s, c) in
         ((k, v) for k, v in TABLE5.items() if k != 'NVLink')}
  mp, ft3 = topology.mpft(NODES), topology.fat_tree_3(NODES)
  def sw(net, g, h):
    a, b = int(net.leaf[g]), int(net.leaf[h])
    return 1 if a == b else topology.switches_on(net, net.paths(a, b)[0])
  cases = [('same leaf (MPFT plane, FT2)', sw(mp, 0, 8), False, 0),
           ('cross leaf (MPFT plane, FT2)', sw(mp, 0, 8 * 255), False, 1),
           ('cross plane, cross leaf (MPFT: NVLink, then PXN)', sw(mp, 0, 8 * 255), True, None),
           ('FT3: cross edge, same pod', sw(ft3, 0, 8 * 4), False, None),
           ('FT3: cross pod', sw(ft3, 0, 8 * 255), False, None)]
  rows = []
  for name, switches, nvlink, pub in cases:
    extra = TABLE5['NVLink'] if nvlink else 0.0
    rows.append(dict(path=name, switches=switches,
                     ib_us=fit['InfiniBand'][1] + fit['InfiniBand'][0] * switches + extra,
                     roce_us=fit['RoCE'][1] + fit['RoCE'][0] * switches + extra,
                     published_ib_us=None if pub is None else TABLE5['InfiniBand'][pub],
                     published_roce_us=None if pub is None else TABLE5['RoCE'][pub]))
  return rows


def build(seed: int = 0) -> dict[str, list[dict]]:
  start = time.perf_counter()
  out = dict(all_to_all=all_to_all_rows(seed), ep=ep_rows(seed),
             collectives=collective_rows(seed), isolation=isolation_rows(seed),
             robustness=robustness_rows(seed), latency=latency_rows())
  out['meta'] = [dict(seed=seed, nodes=NODES, seconds=time.perf_counter() - start)]
  return out


def _fmt(v) -> str:
  if v is None:
    return '—'
  if isinstance(v, float):
    return f'{v:,.2f}'
  return f'{v:,}' if isinstance(v, int) else str(v)


def to_markdown(tables: dict[str, list[dict]]) -> str:
  out = []
  for key, rows in tables.items():
    if not rows:
      continue
    cols = list(rows[0])
    out += [f'### {key}', '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    out += ['| ' + ' | '.join(_fmt(r[c]) for c in cols) + ' |' for r in rows] + ['']
  return '\n'.join(out)


def to_json(tables: dict[str, list[dict]]) -> str:
  return json.dumps(tables, separators=(',', ':'), default=float)


def plot(tables: dict[str, list[dict]], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 3, figsize=(15, 4))
  a2a = tables['all_to_all']
  labels = sorted({r['gpus'] for r in a2a})
  series = sorted({(r['topology'], r['routing']) for r in a2a})
  for i, s in enumerate(series):
    ys = [next(r['gb_s_per_gpu'] for r in a2a if (r['topology'], r['routing']) == s
               and r['gpus'] == g) for g in labels]
    ax[0].bar(np.arange(len(labels)) + i * 0.2, ys, 0.2, label=' '.join(s))
  ax[0].set_xticks(np.arange(len(labels)) + 0.3, [str(g) for g in labels])
  ax[0].set(xlabel='GPUs', ylabel='all-to-all GB/s per GPU', title='All-to-all (cf. Fig. 5)')
  ax[0].legend(fontsize=7)
  iso = tables['isolation']
  bars = ax[1].bar([f"{r['topology']}\n{r['routing']}" for r in iso], [r['slowdown'] for r in iso])
  for bar, r in zip(bars, iso):
    ax[1].annotate(f"{r['a_rails_touched']} rails hit", (bar.get_x() + bar.get_width() / 2,
                   bar.get_height()), ha='center', va='bottom', fontsize=7)
  ax[1].set(ylabel="job A's ring-step slowdown", title='A second job (isolation, §5.1.1)')
  rob = tables['robustness']
  names = [f"{r['topology']} {r['routing']}\n{r['failure']}" for r in rob]
  ax[2].barh(names, [r['slowdown'] for r in rob])
  ax[2].tick_params(axis='y', labelsize=6)
  ax[2].set(xlabel='all-to-all slowdown, 2,048 GPUs', title='Failures (robustness, §5.1.1)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

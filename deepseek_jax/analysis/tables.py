"""The DeepSeek papers' tables, recomputed: rows of figures next to the published ones, rendered as
Markdown or one JSON object (`python -m experiments.analysis [--format=json]`).

Published figures: V3 report (arXiv 2412.19437), V2 paper (arXiv 2405.04434), and ISCA'25
"Insights into DeepSeek-V3" (arXiv 2505.09343): Table 1 (KV cache), Table 2 (training compute),
Table 3 (network), §2.3.2 (EP decode limit), §4.3 (node-limited routing).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from deepseek_jax.analysis import dense_models, ep_decode, flops, kv_cache, network, params
from deepseek_jax.config import ModelConfig

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Table:
  key: str                                           # the JSON key
  title: str
  columns: tuple[tuple[str, str, Callable], ...]     # (row field, header, formatter)
  rows: list[Row]
  notes: tuple[str, ...] = ()


def _int(v) -> str:
  return '—' if v is None else f'{v:,}'


def _b(v) -> str:
  return '—' if v is None else '0' if v == 0 else f'{v / 1e9:,.2f}B'


def _fixed(digits: int) -> Callable:
  return lambda v: '—' if v is None else f'{v:,.{digits}f}'


def _ratio(v) -> str:
  return '—' if v is None else f'{v:.2f}x'


def _pct(v) -> str:
  return '—' if v is None else f'{v:+.1f}%'


def _whole(v: float | None) -> int | None:
  return None if v is None else int(v)


def _gap(computed: float, published: float | None) -> float | None:
  return None if published is None else 100.0 * (computed / published - 1.0)


def params_table(ours: dict[str, tuple[ModelConfig, float, float, float | None]]) -> Table:
  """ours: name -> (config, published total, published activated, published MTP)."""
  rows = []
  for name, (cfg, total, activated, mtp) in ours.items():
    c = params.count(cfg)
    rows.append(dict(name=name, total=c.total, activated=c.activated,
                     activated_without_embedding=c.activated - c.embedding, mtp=c.mtp,
                     published_total=_whole(total), published_activated=_whole(activated),
                     published_mtp=_whole(mtp), source='jax.eval_shape'))
  for model, total in ((dense_models.QWEN2_5_72B, 72.7e9), (dense_models.LLAMA3_1_405B, 405e9)):
    rows.append(dict(name=model.name, total=model.total_params, activated=model.total_params,
                     activated_without_embedding=model.matmul_params, mtp=0,
                     published_total=_whole(total), published_activated=None,
                     published_mtp=None, source='config shapes'))
  return Table('params', 'Parameters (V3 report, V2 paper)', (
      ('name', 'model', str), ('total', 'total', _b), ('published_total', 'published', _b),
      ('activated_without_embedding', 'activated / token, without input embedding', _b),
      ('published_activated', 'published', _b), ('activated', 'with it', _b),
      ('mtp', 'MTP (unique)', _b), ('published_mtp', 'published', _b),
      ('source', 'from', str)), rows, (
      'Ours: `params.count` of the model built from `experiments/configs/<name>.py`, through '
      '`jax.eval_shape`; total and activated exclude MTP. Qwen / LLaMA: counted from their '
      'config shapes (`dense_models.py`).',
      'Activated keeps K of E routed experts. The papers\' activated figures leave out the input '
      'embedding (a gather, no FLOPs), so they sit next to the count without it.',
      'MTP: the unique parameters of the depth-1 module (embedding and head are shared); the '
      'release\'s README_WEIGHTS counts 11.5B.'))


def kv_cache_table(v3: ModelConfig, v2: ModelConfig) -> Table:
  qwen, llama = dense_models.QWEN2_5_72B, dense_models.LLAMA3_1_405B
  base = kv_cache.mla_bytes(v3)
  entries = (  # name, attention, bytes, published KB, published ratio
      ('DeepSeek-V3', 'MLA, BF16', base, 70.272, 1.0),
      ('DeepSeek-V3', 'MLA, FP8 latent as FlashMLA stores it', kv_cache.mla_fp8_bytes(v3),
       None, None),
      ('DeepSeek-V2', 'MLA, BF16', kv_cache.mla_bytes(v2), None, None),
      ('Qwen-2.5-72B', f'GQA, {qwen.num_kv_heads} KV heads', kv_cache.dense_bytes(qwen),
       327.680, 4.66),
      ('LLaMA-3.1-405B', f'GQA, {llama.num_kv_heads} KV heads', kv_cache.dense_bytes(llama),
       516.096, 7.28),
      ('LLaMA-3.1-405B', f'as MHA, {llama.num_heads} KV heads',
       kv_cache.dense_bytes(llama, llama.num_heads), None, None),
      ('LLaMA-3.1-405B', 'as MQA, 1 KV head', kv_cache.dense_bytes(llama, 1), None, None),
      ('DeepSeek-V3', f'as MHA, {v3.num_heads} heads of k {v3.qk_head_dim} + v {v3.v_head_dim}',
       kv_cache.mla_as_kv_heads_bytes(v3), None, None),
      ('DeepSeek-V3', 'as MQA, 1 head', kv_cache.mla_as_kv_heads_bytes(v3, 1), None, None),
  )
  rows = [dict(name=f'{name}: {attention}', attention=attention, bytes_per_token=b,
               kb_per_token=b / 1000, ratio=b / base, published_kb_per_token=kb,
               published_ratio=ratio) for name, attention, b, kb, ratio in entries]
  fp8 = kv_cache.mla_fp8_bytes_per_layer(v3)
  return Table('kv_cache', 'KV cache per token (ISCA\'25 Table 1)', (
      ('name', 'model', str), ('bytes_per_token', 'bytes / token', _int),
      ('kb_per_token', 'KB', _fixed(3)), ('published_kb_per_token', 'published KB', _fixed(3)),
      ('ratio', 'vs MLA BF16', _ratio), ('published_ratio', 'published', _ratio)), rows, (
      f'KB = 1000 bytes; all layers. MLA caches c_KV [C] and k_rope [R]: ({v3.kv_lora_rank} + '
      f'{v3.qk_rope_head_dim}) x 2 B x {v3.num_layers} layers for V3; GQA / MQA / MHA cache a '
      'key and a value per KV head.',
      f'Table 1 prints 7.28x for LLaMA-3.1-405B, but its own figures give 516.096 / 70.272 = '
      f'{516.096 / 70.272:.2f}x; we print the computed ratio (Qwen\'s 4.66x agrees).',
      f'FP8 row: FlashMLA\'s layout, {v3.kv_lora_rank} E4M3 values + '
      f'{v3.kv_lora_rank // kv_cache.FP8_SCALE_TILE} FP32 scales + {v3.qk_rope_head_dim} BF16 '
      f'rope values = {fp8} bytes per token per layer.',
      'The "as MHA / MQA" rows are hypothetical: the same model caching materialized keys and '
      'values instead of the latent.'))


def train_flops_table(v3: ModelConfig, v2: ModelConfig) -> Table:
  entries = (  # name, TrainFlops, published GFLOPs
      ('DeepSeek-V2', flops.for_config(v2), 155.0),
      ('DeepSeek-V3', flops.for_config(v3), 250.0),
      ('DeepSeek-V3 with MTP (depth 1)', flops.for_config(v3, with_mtp=True), None),
      ('Qwen-2.5-72B', flops.for_dense(dense_models.QWEN2_5_72B), 394.0),
      ('LLaMA-3.1-405B', flops.for_dense(dense_models.LLAMA3_1_405B), 2448.0),
  )
  rows = [dict(name=name, gflops_per_token=f.total / 1e9, matmul_gflops=f.matmul / 1e9,
               attention_gflops=f.attention / 1e9, published_gflops_per_token=pub,
               gap_pct=_gap(f.total / 1e9, pub)) for name, f, pub in entries]
  qwen_6p = 6 * dense_models.QWEN2_5_72B.matmul_params / 1e9
  return Table('train_flops', 'Training compute per token, sequence 4096 (ISCA\'25 Table 2)', (
      ('name', 'model', str), ('matmul_gflops', '6 P', _fixed(1)),
      ('attention_gflops', 'attention', _fixed(1)), ('gflops_per_token', 'GFLOPs / token',
                                                     _fixed(1)),
      ('published_gflops_per_token', 'published', _fixed(0)), ('gap_pct', 'gap', _pct)), rows, (
      'FLOPs/token = 6 P + 3 L N (d_qk + d_v) S: P activated parameters without the input '
      'embedding, causal attention (S/2 keys per query on average), backward = 2 x forward '
      '(`deepseek_jax/analysis/flops.py`).',
      f'Qwen: Table 2\'s 394 ("Qwen-72B") is below 6 P = {qwen_6p:.1f} GFLOPs of Qwen2.5-72B\'s '
      'weights alone, so no attention term reaches it from these shapes; Qwen-72B v1 (MHA, FFN '
      '24576) has nearly the same P. The paper does not state its formula; the gap stays.'))


def network_table(cost: network.CostModel = network.CostModel(),
                  radix: int = network.RADIX) -> Table:
  ft2 = network.fat_tree_2(radix)
  entries = (  # topology, published (M$, k$ per endpoint)
      (ft2, (9, 4.39)), (network.multi_plane(ft2, 8), (72, 4.39)),
      (network.fat_tree_3(radix), (491, 7.5)), (network.slim_fly(radix), (146, 4.4)),
      (network.dragonfly(radix, groups=511), (1522, 5.8)),
      (network.slim_fly(radix, prime_power=True), (None, None)),
      (network.dragonfly(radix), (None, None)),
  )
  rows = []
  for t, (musd, kusd) in entries:
    usd = cost.cost_usd(t)
    rows.append(dict(name=t.name, endpoints=t.endpoints, switches=t.switches, links=t.links,
                     cost_musd=usd / 1e6, cost_per_endpoint_kusd=usd / t.endpoints / 1e3,
                     published_cost_musd=musd, published_cost_per_endpoint_kusd=kusd,
                     cost_gap_pct=_gap(usd / 1e6, musd)))
  return Table('network', f'Scale-out networks of {radix}-port switches (ISCA\'25 Table 3)', (
      ('name', 'topology', str), ('endpoints', 'endpoints', _int),
      ('switches', 'switches', _int), ('links', 'links', _int),
      ('cost_musd', 'cost M$', _fixed(1)), ('published_cost_musd', 'published', _fixed(0)),
      ('cost_per_endpoint_kusd', 'k$ / endpoint', _fixed(2)),
      ('published_cost_per_endpoint_kusd', 'published', _fixed(2)),
      ('cost_gap_pct', 'cost gap', _pct)), rows, (
      f'Cost = switches x {cost.switch_usd:,.0f} USD + switch-to-switch links x '
      f'{cost.link_usd:,.0f} USD + endpoints x {cost.endpoint_link_usd:,.0f} USD: our '
      'calibration to Table 3 (which follows the Slim Fly paper\'s method but publishes no '
      'prices), not vendor quotes (`deepseek_jax/analysis/network.py`).',
      'SF: Table 3\'s 1,568 switches are 2 q^2 with q = 28, which is not a prime power, so no MMS '
      'graph of that size exists; q = 27 is the largest constructible one.',
      'DF: Table 3 has 511 groups of 32 routers (16,352 = 32 x 511), two fewer than the '
      'canonical maximum a h + 1 = 513; its links count every port wired, routers x (a-1+h)/2.'))


def ep_decode_table(v3: ModelConfig) -> Table:
  gb = ep_decode.GB
  entries = (  # name, DecodeLimit, bandwidth GB/s, hidden, published (us, ms, tokens/s)
      ('§2.3.2: CX7 400G IB, hidden "7K"', ep_decode.decode_limit(), 50, 7000,
       (120.96, 14.76, 67)),
      ('§2.3.2: GB200 NVL72, hidden "7K"',
       ep_decode.decode_limit(bandwidth_bytes_per_s=900 * gb), 900, 7000, (6.72, 0.82, 1200)),
      ('deepseek_v3.py: CX7 400G IB', ep_decode.decode_limit_for_config(v3), 50,
       v3.hidden_size, (None, None, None)),
      ('deepseek_v3.py: GB200 NVL72',
       ep_decode.decode_limit_for_config(v3, bandwidth_bytes_per_s=900 * gb), 900,
       v3.hidden_size, (None, None, None)),
  )
  rows = [dict(name=name, bandwidth_gb_s=bw, hidden_size=hidden,
               us_per_all_to_all=d.us_per_all_to_all, tpot_ms=d.tpot_ms,
               tokens_per_s=d.tokens_per_s, published_us_per_all_to_all=us,
               published_tpot_ms=ms, published_tokens_per_s=tps)
          for name, d, bw, hidden, (us, ms, tps) in entries]
  return Table('ep_decode', 'Expert-parallel decode limit (ISCA\'25 §2.3.2)', (
      ('name', 'setting', str), ('bandwidth_gb_s', 'GB/s', _int), ('hidden_size', 'hidden', _int),
      ('us_per_all_to_all', 'µs / all-to-all', _fixed(2)),
      ('published_us_per_all_to_all', 'published', _fixed(2)),
      ('tpot_ms', 'TPOT ms', _fixed(2)), ('published_tpot_ms', 'published', _fixed(2)),
      ('tokens_per_s', 'tokens/s', _fixed(1)), ('published_tokens_per_s', 'published',
                                                _fixed(0))), rows, (
      'One all-to-all = one EP step, dispatch (FP8, 1 B) + combine (BF16, 2 B) of 32 tokens x 9 '
      'experts (8 routed + 1 shared) x hidden; 2 per layer (dual micro-batch overlap), no latency '
      'or compute (`deepseek_jax/analysis/ep_decode.py`).',
      f'The paper\'s "7K" is 7000; with deepseek_v3.py\'s hidden size {v3.hidden_size} every '
      f'time is {100 * (v3.hidden_size / 7000 - 1):.1f}% longer.'))


def node_limited_table(v3: ModelConfig) -> Table:
  t = ep_decode.node_limited_traffic_for_config(v3)
  rows = [dict(name=f'DeepSeek-V3: K={v3.num_experts_per_tok}, {v3.n_group} nodes, '
                    f'M={v3.topk_group}',
               worst_unlimited=t.worst_unlimited, worst_limited=t.worst_limited,
               saved_worst_pct=100 * t.saved_worst, expected_unlimited=t.expected_unlimited,
               expected_limited=t.expected_limited, saved_expected_pct=100 * t.saved_expected,
               published_worst_unlimited=8, published_worst_limited=4)]
  return Table('node_limited', 'Inter-node sends per token under node-limited routing '
               '(ISCA\'25 §4.3)', (
      ('name', 'routing', str), ('worst_unlimited', 'worst, no limit', _int),
      ('published_worst_unlimited', 'published', _int),
      ('worst_limited', 'worst, M nodes', _int), ('published_worst_limited', 'published', _int),
      ('saved_worst_pct', 'saved %', _fixed(0)),
      ('expected_unlimited', 'uniform, no limit', _fixed(2)),
      ('expected_limited', 'uniform, M nodes', _fixed(2)),
      ('saved_expected_pct', 'saved %', _fixed(1))), rows, (
      'A token crosses IB once per destination node, then NVLink fans it out; "uniform" draws '
      'the K experts uniformly (inside M uniform nodes when limited).',))


def build(v3: ModelConfig, v2: ModelConfig, v2_lite: ModelConfig | None = None) -> list[Table]:
  """Every table from our configs (V3, V2 and optionally V2-Lite) and the dense models' data."""
  ours = {'DeepSeek-V3': (v3, 671e9, 37e9, 11.5e9), 'DeepSeek-V2': (v2, 236e9, 21e9, None)}
  if v2_lite is not None:
    ours['DeepSeek-V2-Lite'] = (v2_lite, 15.7e9, 2.4e9, None)
  return [params_table(ours), kv_cache_table(v3, v2), train_flops_table(v3, v2),
          network_table(), ep_decode_table(v3), node_limited_table(v3)]


def to_json(tables: list[Table]) -> str:
  return json.dumps({t.key: t.rows for t in tables}, indent=1)


def to_markdown(tables: list[Table]) -> str:
  out = []
  for t in tables:
    out += [f'### {t.title}', '', '| ' + ' | '.join(h for _, h, _ in t.columns) + ' |',
            '|' + '---|' * len(t.columns)]
    out += ['| ' + ' | '.join(fmt(row[key]) for key, _, fmt in t.columns) + ' |'
            for row in t.rows]
    out += [''] + [f'- {note}' for note in t.notes] + ['']
  return '\n'.join(out)


def render(tables: list[Table], fmt: str) -> str:
  if fmt == 'json':
    return to_json(tables)
  if fmt == 'markdown':
    return to_markdown(tables)
  raise ValueError(f'format={fmt!r}: must be "markdown" or "json"')

"""The papers' tables recomputed from our configs, against the published figures: V3 report, V2
paper, ISCA'25 "Insights into DeepSeek-V3" Tables 1-3 and §2.3.2 / §4.3."""

import json

import pytest
from absl import flags

from deepseek_jax.analysis import dense_models, ep_decode, flops, kv_cache, network, params, tables
from deepseek_jax.config import ModelConfig
from experiments import analysis
from experiments.configs import deepseek_v2, deepseek_v3

QWEN, LLAMA = dense_models.QWEN2_5_72B, dense_models.LLAMA3_1_405B


def _model(module) -> ModelConfig:
  return ModelConfig.from_dict(module.get_config().model.to_dict())


@pytest.fixture(scope='module')
def v3():
  return _model(deepseek_v3)


@pytest.fixture(scope='module')
def v2():
  return _model(deepseek_v2)


def _within(computed, published, tolerance):
  return abs(computed / published - 1.0) <= tolerance


# ---- Table 1: KV cache per token -----------------------------------------------------------------
def test_kv_cache_bytes_per_token_equal_table_1(v3):
  assert kv_cache.mla_bytes(v3) == 70_272         # 70.272 KB
  assert kv_cache.dense_bytes(QWEN) == 327_680    # 327.680 KB
  assert kv_cache.dense_bytes(LLAMA) == 516_096   # 516.096 KB


def test_kv_cache_ratios_and_the_printed_7_28(v3):
  mla = kv_cache.mla_bytes(v3)
  assert round(kv_cache.dense_bytes(QWEN) / mla, 2) == 4.66
  # Table 1 prints 7.28x, but 516.096 / 70.272 = 7.34x: we report the computed ratio.
  assert round(kv_cache.dense_bytes(LLAMA) / mla, 2) == 7.34
  table = tables.kv_cache_table(v3, v3)
  llama = next(r for r in table.rows if r['name'].startswith('LLaMA-3.1-405B: GQA'))
  assert round(llama['ratio'], 2) == 7.34 and llama['published_ratio'] == 7.28
  assert any('7.28x' in note and '7.34x' in note for note in table.notes)


def test_fp8_latent_cache_is_flashmla_656_bytes_per_layer(v3):
  assert kv_cache.mla_fp8_bytes_per_layer(v3) == 512 * 1 + 4 * 4 + 64 * 2 == 656
  assert kv_cache.mla_fp8_bytes(v3) == 656 * 61


def test_mha_and_mqa_bound_gqa(v3):
  assert kv_cache.dense_bytes(LLAMA, LLAMA.num_heads) == 16 * kv_cache.dense_bytes(LLAMA)
  assert kv_cache.dense_bytes(LLAMA, 1) * 8 == kv_cache.dense_bytes(LLAMA)
  # V3's heads materialized: 128 heads x (192 + 128) x 2 B x 61 layers, 71x the latent.
  assert kv_cache.mla_as_kv_heads_bytes(v3) == 4_997_120
  assert kv_cache.mla_as_kv_heads_bytes(v3, 1) * 128 == 4_997_120


# ---- Parameters ----------------------------------------------------------------------------------
def test_deepseek_v3_parameters_671b_37b_and_the_summary_mtp(v3):
  c = params.count(v3)
  assert round(c.total / 1e9) == 671      # V3 report: 671B total
  # 37B activated per token: the papers' activated counts leave out the input embedding (a gather);
  # with it, 37.55B.
  assert round((c.activated - c.embedding) / 1e9) == 37
  row = tables.params_table({'DeepSeek-V3': (v3, 671e9, 37e9, 11.5e9)}).rows[0]
  assert row['mtp'] == c.mtp
  assert f'{c.mtp:,}' in params.summary(v3, with_shapes=False)  # as the summary reports it
  assert 11.5e9 <= c.mtp < 11.7e9         # release README: 11.5B unique MTP parameters


def test_deepseek_v2_parameters_236b_21b(v2):
  c = params.count(v2)
  assert round(c.total / 1e9) == 236      # V2 paper: 236B total
  assert round((c.activated - c.embedding) / 1e9) == 21   # 21B activated per token
  assert c.mtp == 0


def test_dense_models_parameters():
  assert round(QWEN.total_params / 1e8) == 727          # Qwen2.5 report: 72.7B
  assert 405e9 <= LLAMA.total_params < 406e9             # LLaMA 3.1: 405B


# ---- Table 2: training compute per token -------------------------------------------------------
def test_train_flops_deepseek_v3_250(v3):
  f = flops.for_config(v3)
  assert f.attention == 3 * 61 * 128 * (192 + 128) * 4096
  assert _within(f.total / 1e9, 250, 0.03)


def test_train_flops_deepseek_v2_155_and_llama_2448(v2):
  assert _within(flops.for_config(v2).total / 1e9, 155, 0.03)
  assert _within(flops.for_dense(LLAMA).total / 1e9, 2448, 0.03)


def test_train_flops_qwen_gap_is_reported_with_its_reason(v3, v2):
  qwen = flops.for_dense(QWEN)
  assert qwen.matmul / 1e9 > 394  # the weights alone exceed Table 2's figure: no formula closes it
  row = next(r for r in tables.train_flops_table(v3, v2).rows if r['name'] == 'Qwen-2.5-72B')
  assert row['published_gflops_per_token'] == 394 and row['gap_pct'] > 3


def test_non_causal_attention_doubles_the_attention_term(v3):
  assert flops.for_config(v3, causal=False).attention == 2 * flops.for_config(v3).attention


# ---- Table 3: network topologies and cost ------------------------------------------------------
TABLE_3 = {  # endpoints, switches, links, cost M$, cost per endpoint k$
    'FT2': (2_048, 96, 2_048, 9, 4.39),
    'MPFT': (16_384, 768, 16_384, 72, 4.39),
    'FT3': (65_536, 5_120, 131_072, 491, 7.5),
    'SF': (32_928, 1_568, 32_928, 146, 4.4),
    'DF': (261_632, 16_352, 384_272, 1_522, 5.8),
}


def _table_3_topologies():
  ft2 = network.fat_tree_2(64)
  return {'FT2': ft2, 'MPFT': network.multi_plane(ft2, 8), 'FT3': network.fat_tree_3(64),
          'SF': network.slim_fly(64), 'DF': network.dragonfly(64, groups=511)}


@pytest.mark.parametrize('name', sorted(TABLE_3))
def test_topology_counts_equal_table_3(name):
  t = _table_3_topologies()[name]
  assert (t.endpoints, t.switches, t.links) == TABLE_3[name][:3]


@pytest.mark.parametrize('name', sorted(TABLE_3))
def test_topology_cost_within_5_percent_of_table_3(name):
  t, cost = _table_3_topologies()[name], network.CostModel()
  *_, musd, kusd = TABLE_3[name]
  assert _within(cost.cost_usd(t) / 1e6, musd, 0.05)
  assert _within(cost.cost_per_endpoint_usd(t) / 1e3, kusd, 0.05)


def test_slim_fly_and_dragonfly_sizes():
  assert network.slim_fly(64).name == 'SF (q=28)'  # Table 3's q: not a prime power
  assert network.slim_fly(64, prime_power=True).switches == 2 * 27 ** 2
  assert network.dragonfly(64).switches == 32 * (32 * 16 + 1)  # canonical maximum, a h + 1
  with pytest.raises(ValueError, match='groups=514'):
    network.dragonfly(64, groups=514)


# ---- §2.3.2: EP decode limit, §4.3: node-limited routing ---------------------------------------
def test_ep_decode_limit_at_50_and_900_gb_per_s():
  ib = ep_decode.decode_limit(bandwidth_bytes_per_s=50e9)
  assert ib.us_per_all_to_all == pytest.approx(120.96)
  assert round(ib.tpot_ms, 2) == 14.76
  assert int(ib.tokens_per_s) == 67
  nvl = ep_decode.decode_limit(bandwidth_bytes_per_s=900e9)
  assert nvl.us_per_all_to_all == pytest.approx(6.72)
  assert round(nvl.tpot_ms, 2) == 0.82
  assert round(nvl.tokens_per_s, -2) == 1200


def test_ep_decode_reads_experts_hidden_and_layers_from_the_config(v3):
  d = ep_decode.decode_limit_for_config(v3, hidden_size=7000)
  assert d.us_per_all_to_all == pytest.approx(120.96)  # 8 routed + 1 shared, 61 layers
  assert round(d.tpot_ms, 2) == 14.76


def test_node_limited_routing_halves_worst_case_ib_traffic(v3):
  t = ep_decode.node_limited_traffic_for_config(v3)
  assert (t.worst_unlimited, t.worst_limited, t.saved_worst) == (8, 4, 0.5)  # §4.3: 8t -> 4t
  assert t.expected_limited < 4 < t.expected_unlimited < 8


# ---- the command ---------------------------------------------------------------------------------
@pytest.fixture
def parsed_flags():
  yield lambda *args: flags.FLAGS(['analysis', *args])
  flags.FLAGS.unparse_flags()


def test_command_prints_json_and_markdown(parsed_flags, capsys):
  parsed_flags('--format=json')
  analysis.main([])
  out = json.loads(capsys.readouterr().out)
  required = {'params': ('total', 'activated', 'mtp'), 'kv_cache': ('bytes_per_token', 'ratio'),
              'train_flops': ('gflops_per_token',),
              'network': ('endpoints', 'switches', 'links', 'cost_musd',
                          'cost_per_endpoint_kusd'),
              'ep_decode': ('us_per_all_to_all', 'tpot_ms', 'tokens_per_s')}
  for key, fields in required.items():
    assert out[key], key
    for row in out[key]:
      assert isinstance(row['name'], str) and all(f in row for f in fields), (key, row)
      assert not any(isinstance(v, (dict, list)) for v in row.values())  # flat rows
  by_name = {r['name']: r for r in out['kv_cache']}
  assert by_name['DeepSeek-V3: MLA, BF16']['bytes_per_token'] == 70_272
  assert {r['name']: r['endpoints'] for r in out['network']}['DF (511 groups)'] == 261_632

  parsed_flags('--format=markdown')
  analysis.main([])
  markdown = capsys.readouterr().out
  assert '| DeepSeek-V3: MLA, BF16 | 70,272 | 70.272 | 70.272 |' in markdown
  assert '| FT3 | 65,536 | 5,120 | 131,072 |' in markdown

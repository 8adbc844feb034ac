"""Logits parity with transformers' DeepseekV3ForCausalLM through `convert.hf.load_pretrained`.

Tiny random HF models (float32, eager attention, every RMSNorm weight and the router bias
randomised so layout mistakes show) are written with `save_pretrained`, sometimes rewritten (FP8
blocks, fused experts, an appended MTP layer) and loaded into our model; max |dlogit| <= 1e-4.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')

from flax import nnx  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.modeling_layers import MtpLayer  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402

from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.convert import hf as convert  # noqa: E402
from deepseek_jax.layers import rope  # noqa: E402

TOL = 1e-4
BASE = dict(  # D 64, N 4, H 16, R 8, U 16, C 32, Q 48, E 8 in 4 groups, top-3 of 2 groups
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=48, kv_lora_rank=32, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, topk_method='noaux_tc',
    scoring_func='sigmoid', max_position_embeddings=256, initializer_range=0.1,
    rope_parameters={'rope_type': 'default', 'rope_theta': 10_000.0}, num_nextn_predict_layers=0)
YARN = {'rope_type': 'yarn', 'rope_theta': 10.0, 'factor': 4.0,  # theta 10: a real ramp for R 8
        'original_max_position_embeddings': 16, 'beta_fast': 32.0, 'beta_slow': 1.0}
YARN_MAX_POSITION = 64  # factor x original, else HF warns


def randomize_(module: torch.nn.Module, seed: int) -> None:
  """RMSNorm weights in [0.5, 1.5] and a nonzero router bias: identity-like values hide bugs."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
      if name.endswith('norm.weight'):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      elif name.endswith('e_score_correction_bias'):
        tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))


def hf_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
  torch.manual_seed(seed)
  config = DeepseekV3Config(**{**BASE, **overrides})
  config._attn_implementation = 'eager'
  model = DeepseekV3ForCausalLM(config).float().eval()
  randomize_(model, seed)
  return model


def tokens_for(vocab: int, T: int = 16, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (2, T)).astype(np.int32)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def rewrite(directory: pathlib.Path, change) -> None:
  """Applies change(dict name -> tensor) -> dict to every shard, keeping the index consistent."""
  index_path = directory / 'model.safetensors.index.json'
  index = json.loads(index_path.read_text()) if index_path.exists() else None
  for file in sorted(directory.glob('*.safetensors')):
    tensors = change(safetensors_torch.load_file(file))
    safetensors_torch.save_file(tensors, file, metadata={'format': 'pt'})
    if index is not None:
      index['weight_map'] = {k: v for k, v in index['weight_map'].items() if v != file.name}
      index['weight_map'].update({name: file.name for name in tensors})
  if index is not None:
    index_path.write_text(json.dumps(index))


def max_delta(model, directory: pathlib.Path, tokens: np.ndarray) -> float:
  _, ours = convert.load_pretrained(directory)
  logits = np.asarray(ours(jnp.asarray(tokens)).logits)
  return float(np.max(np.abs(logits - hf_logits(model, tokens))))


# ---- (a)-(e): configurations ---------------------------------------------------------------------

CASES = {
    'group_limited_bias': dict(),                                    # (a), (d) first_k_dense=1
    'plain_query_all_moe': dict(q_lora_rank=None, first_k_dense_replace=0),  # (b), (d) 0
    'yarn_mscale_0.707_1': dict(rope_parameters={**YARN, 'mscale': 0.707, 'mscale_all_dim': 1.0},
                                max_position_embeddings=YARN_MAX_POSITION),  # (c)
    'yarn_mscale_1_1': dict(rope_parameters={**YARN, 'mscale': 1.0, 'mscale_all_dim': 1.0},
                            max_position_embeddings=YARN_MAX_POSITION),
    'yarn_no_mscale_keys': dict(rope_parameters=YARN,  # HF's defaults for absent mscale keys
                                max_position_embeddings=YARN_MAX_POSITION),
    'dense_two_of_three': dict(first_k_dense_replace=2, n_group=1, topk_group=1),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_match_hf(case, tmp_path):
  model = hf_model(**CASES[case])
  model.save_pretrained(tmp_path)
  T = 20 if 'yarn' in case else 16  # YaRN: longer than original_max_position_embeddings
  delta = max_delta(model, tmp_path, tokens_for(BASE['vocab_size'], T))
  print(f'{case}: max |dlogit| = {delta:.2e}')
  assert delta <= TOL


def test_bias_and_group_limit_change_routing(tmp_path):
  """(a) is only sharp if the bias and the group limit both move experts in that model."""
  model = hf_model()
  model.save_pretrained(tmp_path)
  cfg, ours = convert.load_pretrained(tmp_path, scan_layers=False)  # a module per layer to edit
  tokens = jnp.asarray(tokens_for(BASE['vocab_size']))
  reference = np.asarray(ours(tokens).logits)
  for layer in ours.layers[1:]:  # all groups allowed
    layer.ffn.cfg = cfg.replace(topk_group=cfg.n_group)
  assert np.max(np.abs(reference - np.asarray(ours(tokens).logits))) > 1e-2
  for layer in ours.layers[1:]:  # groups limited again, no bias
    layer.ffn.cfg = cfg
    layer.ffn.router_bias.set_value(jnp.zeros_like(layer.ffn.router_bias.get_value()))
  assert np.max(np.abs(reference - np.asarray(ours(tokens).logits))) > 1e-2


def test_sharded_checkpoint(tmp_path):  # (e)
  model = hf_model(seed=1)
  model.save_pretrained(tmp_path, max_shard_size='40KB')
  shards = list(tmp_path.glob('*.safetensors'))
  assert len(shards) > 3 and (tmp_path / 'model.safetensors.index.json').exists()
  delta = max_delta(model, tmp_path, tokens_for(BASE['vocab_size'], seed=1))
  print(f'sharded ({len(shards)} files): max |dlogit| = {delta:.2e}')
  assert delta <= TOL


# ---- (f) FP8 -------------------------------------------------------------------------------------

def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
  """Block-scaled E4M3 as in DeepSeek's release: scale = amax / 448 per 128x128 block."""
  out_dim, in_dim = w.shape
  pad = torch.zeros(-(-out_dim // block) * block, -(-in_dim // block) * block)
  pad[:out_dim, :in_dim] = w
  blocks = pad.reshape(pad.shape[0] // block, block, pad.shape[1] // block, block)
  scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
  expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_dim, :in_dim]
  return (w / expanded).to(torch.float8_e4m3fn), scale.float()


def write_fp8(model, directory: pathlib.Path, quantized=lambda name, w: 'embed_tokens' not in name,
              max_shard_size: str = '600KB') -> dict[str, torch.Tensor]:
  """`model` saved with every 2-D weight that `quantized(name, w)` picks in FP8 (`quantize_fp8`,
  with its `_scale_inv`); returns those weights dequantized, in float32, by name."""
  model.save_pretrained(directory, max_shard_size=max_shard_size)
  dequantized = {}

  def to_fp8(tensors):
    out = {}
    for name, w in tensors.items():
      if w.ndim == 2 and quantized(name, w):
        q, scale = quantize_fp8(w)
        out[name], out[name + '_scale_inv'] = q, scale
        dequantized[name] = q.float() * scale.repeat_interleave(128, 0).repeat_interleave(
            128, 1)[:w.shape[0], :w.shape[1]]
      else:
        out[name] = w
    return out

  rewrite(directory, to_fp8)
  return dequantized


def load_dequantized_(model, dequantized: dict[str, torch.Tensor]) -> None:
  """Puts the dequantized weights into the HF model (whose state dict holds experts fused)."""
  state = model.state_dict()
  for name, w in dequantized.items():
    if '.experts.' in name:
      prefix, rest = name.split('.experts.')
      j, proj = int(rest.split('.')[0]), rest.split('.')[1]
      if proj == 'down_proj':
        state[f'{prefix}.experts.down_proj'][j] = w
      else:
        F = w.shape[0]
        rows = slice(0, F) if proj == 'gate_proj' else slice(F, 2 * F)
        state[f'{prefix}.experts.gate_up_proj'][j, rows] = w
    else:
      state[name] = w
  model.load_state_dict(state)


def test_fp8_checkpoint(tmp_path):
  # D 160 and F 272 / 144 make several blocks with ragged edges
  model = hf_model(seed=2, hidden_size=160, intermediate_size=272, moe_intermediate_size=144,
                   q_lora_rank=136, kv_lora_rank=40)
  dequantized = write_fp8(model, tmp_path)  # every linear weight, the head included
  stored = convert.safetensors_io.Checkpoint(tmp_path)
  assert stored.dtype('model.layers.1.self_attn.q_b_proj.weight') == convert.FP8
  assert len(dequantized) > 20 and any(w.shape[1] > 128 for w in dequantized.values())
  load_dequantized_(model, dequantized)  # HF runs on the dequantized weights
  delta = max_delta(model, tmp_path, tokens_for(BASE['vocab_size'], seed=2))
  print(f'fp8: max |dlogit| = {delta:.2e}')
  assert delta <= TOL


def test_dequantize_edges():
  w = np.arange(200 * 130, dtype=np.float32).reshape(200, 130) % 7 - 3
  scale = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  out = convert.dequantize(w.astype(convert.FP8), scale)
  assert out[127, 127] == w[127, 127] and out[127, 128] == 2 * w[127, 128]
  assert out[199, 0] == 3 * w[199, 0] and out[199, 129] == 4 * w[199, 129]
  with pytest.raises(ValueError, match='layer.weight_scale_inv'):
    convert.dequantize(w.astype(convert.FP8), scale[:1], name='layer.weight')


def test_safetensors_io_round_trip(tmp_path):
  """Our writer and reader agree with the safetensors library on BF16, F8_E4M3, F32 and I64."""
  import ml_dtypes
  rng = np.random.default_rng(0)
  arrays = {'bf16': rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
            'f8': rng.normal(size=(4, 2)).astype(ml_dtypes.float8_e4m3fn),
            'f32': rng.normal(size=(7,)).astype(np.float32), 'i64': np.arange(6).reshape(2, 3),
            'empty': np.zeros((0, 3), np.float32)}
  convert.safetensors_io.write_file(tmp_path / 'model.safetensors', arrays)
  theirs = safetensors_torch.load_file(tmp_path / 'model.safetensors')
  ours = convert.safetensors_io.Checkpoint(tmp_path)
  assert theirs['bf16'].dtype == torch.bfloat16 and theirs['f8'].dtype == torch.float8_e4m3fn
  for name, value in arrays.items():
    assert ours.get(name).dtype == value.dtype and ours.shape(name) == value.shape
    np.testing.assert_array_equal(np.asarray(ours.get(name), np.float64), value.astype(np.float64))
    np.testing.assert_array_equal(theirs[name].double().numpy(), value.astype(np.float64))


# ---- (g) both expert layouts ---------------------------------------------------------------------

def test_fused_expert_layout(tmp_path):
  model = hf_model(seed=3)
  model.save_pretrained(tmp_path)
  names = set(safetensors_torch.load_file(tmp_path / 'model.safetensors'))
  assert 'model.layers.1.mlp.experts.0.gate_proj.weight' in names  # save_pretrained: per expert
  assert 'model.layers.1.mlp.experts.gate_up_proj' not in names
  E = BASE['n_routed_experts']

  def fuse(tensors):
    out = {k: v for k, v in tensors.items() if '.experts.' not in k}
    prefixes = {k.split('.experts.')[0] for k in tensors if '.experts.' in k}
    for p in prefixes:
      w = lambda j, proj: tensors[f'{p}.experts.{j}.{proj}.weight']
      out[f'{p}.experts.gate_up_proj'] = torch.stack(
          [torch.cat([w(j, 'gate_proj'), w(j, 'up_proj')]) for j in range(E)])
      out[f'{p}.experts.down_proj'] = torch.stack([w(j, 'down_proj') for j in range(E)])
    return out

  rewrite(tmp_path, fuse)
  delta = max_delta(model, tmp_path, tokens_for(BASE['vocab_size'], seed=3))
  print(f'fused experts: max |dlogit| = {delta:.2e}')
  assert delta <= TOL


# ---- (h) MTP -------------------------------------------------------------------------------------

def test_mtp_layer(tmp_path):
  model = hf_model(seed=4)
  model.save_pretrained(tmp_path)
  L, E = BASE['num_hidden_layers'], BASE['n_routed_experts']
  mtp_config = model.config.get_mtp_config()  # its blocks are all MoE, as ours
  mtp_config._attn_implementation = 'eager'
  torch.manual_seed(4)
  mtp = MtpLayer(mtp_config, hf_v3.DeepseekV3DecoderLayer, hf_v3.DeepseekV3RMSNorm, 0).eval()
  with torch.no_grad():
    for name, p in mtp.named_parameters():
      p.copy_(0.1 * torch.randn(p.shape))
  randomize_(mtp, 5)

  extra = {}  # the released checkpoint's names: model.layers.{L}.*, experts one by one
  for name, w in mtp.state_dict().items():
    name = name.replace('mtp_block.', '').replace('post_norm.', 'shared_head.norm.')
    if name.endswith('experts.gate_up_proj'):
      F = w.shape[1] // 2
      for j in range(E):
        extra[name.replace('gate_up_proj', f'{j}.gate_proj.weight')] = w[j, :F]
        extra[name.replace('gate_up_proj', f'{j}.up_proj.weight')] = w[j, F:]
    elif name.endswith('experts.down_proj'):
      for j in range(E):
        extra[name.replace('down_proj', f'{j}.down_proj.weight')] = w[j]
    else:
      extra[name] = w
  extra['embed_tokens.weight'] = model.model.embed_tokens.weight  # copies of the main ones
  extra['shared_head.head.weight'] = model.lm_head.weight
  rewrite(tmp_path, lambda t: {**t, **{f'model.layers.{L}.{k}': v.detach().clone().contiguous()
                                       for k, v in extra.items()}})

  tokens = tokens_for(BASE['vocab_size'], seed=4)
  cfg, ours = convert.load_pretrained(tmp_path)
  assert cfg.mtp_depth == 1
  out = ours(jnp.asarray(tokens))
  # Reference: h^0 = last block's output before the final norm; module k=1 at position i sees
  # enorm(Emb(t_{i+1})) and hnorm(h^0_i); positions i < T-1 exist, the shared head predicts t_{i+2}.
  captured = {}
  model.model.layers[-1].register_forward_hook(lambda m, a, o: captured.update(h=o))
  ids = torch.from_numpy(tokens.astype(np.int64))
  with torch.no_grad():
    main = model(ids).logits.numpy()
    T1 = ids.shape[1] - 1
    positions = torch.arange(T1)[None]
    causal = torch.full((T1, T1), float('-inf')).triu(1)[None, None]
    h = mtp(model.model.embed_tokens(ids[:, 1:]), captured['h'][:, :T1],
            position_embeddings=model.model.rotary_emb(captured['h'], positions),
            attention_mask=causal, position_ids=positions, cache=None)
    reference = model.lm_head(h).numpy()
  main_delta = float(np.max(np.abs(np.asarray(out.logits) - main)))
  delta = float(np.max(np.abs(np.asarray(out.mtp_logits[0, :, :T1]) - reference)))
  print(f'mtp: main max |dlogit| = {main_delta:.2e}, mtp max |dlogit| = {delta:.2e}')
  assert main_delta <= TOL and delta <= TOL


# ---- (i) errors ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tiny')
  hf_model(seed=6, num_hidden_layers=2).save_pretrained(directory)
  return directory


def _copy(saved: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  for file in saved.iterdir():
    (target / file.name).write_bytes(file.read_bytes())
  return target


@pytest.mark.parametrize('problem, name', [
    ('missing', 'model.layers.1.self_attn.kv_b_proj.weight'),
    ('unknown', 'model.layers.0.self_attn.rotary_emb.inv_freq'),
    ('shape', 'model.layers.1.mlp.experts.5.up_proj.weight'),
    ('scale', 'model.layers.1.self_attn.o_proj.weight_scale_inv'),  # FP8 grid must be 1x1
])
def test_checkpoint_errors_name_the_tensor(saved, tmp_path, problem, name):
  directory = _copy(saved, tmp_path)

  def change(tensors):
    if problem == 'missing':
      del tensors[name]
    elif problem == 'unknown':
      tensors[name] = torch.ones(4)
    elif problem == 'scale':
      weight = name.removesuffix('_scale_inv')
      tensors[weight] = tensors[weight].to(torch.float8_e4m3fn)
      tensors[name] = torch.ones(2, 2)
    else:
      tensors[name] = tensors[name][:-1].contiguous()
    return tensors

  rewrite(directory, change)
  with pytest.raises(ValueError, match=name.replace('.', r'\.')) as error:
    convert.load_pretrained(directory)
  if problem != 'missing':
    assert 'model.safetensors' in str(error.value)  # the file is named too


def test_missing_directory_and_unsupported_config(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    convert.load_pretrained(tmp_path / 'nowhere')
  hf = json.loads((saved / 'config.json').read_text())
  for key, value in (('hidden_act', 'gelu'), ('attention_bias', True),
                     ('rope_interleave', False), ('tie_word_embeddings', True),
                     ('rope_parameters', {'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 8})):
    with pytest.raises(ValueError, match=key):
      convert.config_from_hf({**hf, key: value})


# ---- config mapping ------------------------------------------------------------------------------

def test_config_round_trip(saved):
  cfg = convert.config_from_hf(json.loads((saved / 'config.json').read_text()))
  assert cfg.num_layers == 2 and cfg.first_k_dense == 1 and cfg.use_router_bias
  assert cfg.n_group == 4 and cfg.topk_group == 2 and cfg.rope_factor == 1.0
  for variant in (cfg, cfg.replace(q_lora_rank=None, mtp_depth=2, rope_factor=40.0,
                                   rope_mscale=0.707, rope_mscale_all_dim=0.707)):
    assert convert.config_from_hf(convert.config_to_hf(variant)) == variant
  v2 = {**convert.config_to_hf(cfg), 'model_type': 'deepseek_v2', 'topk_method': 'greedy'}
  del v2['scoring_func'], v2['norm_topk_prob']
  v2_cfg = convert.config_from_hf(v2)
  assert (v2_cfg.scoring_func, v2_cfg.norm_topk_prob, v2_cfg.use_router_bias, v2_cfg.n_group) == (
      'softmax', False, False, 1)


def test_released_v3_config_is_our_default():
  """The released DeepSeek-V3 config.json (older `rope_scaling` style) gives ModelConfig()."""
  released = dict(
      architectures=['DeepseekV3ForCausalLM'], model_type='deepseek_v3', vocab_size=129280,
      hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
      num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
      num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, ep_size=1,
      routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
      v_head_dim=128, qk_nope_head_dim=128, topk_method='noaux_tc', n_group=8, topk_group=4,
      num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
      scoring_func='sigmoid', aux_loss_alpha=0.001, seq_aux=True, hidden_act='silu',
      max_position_embeddings=163840, initializer_range=0.02, rms_norm_eps=1e-06,
      use_cache=True, tie_word_embeddings=False, rope_theta=10000, attention_bias=False,
      rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                        original_max_position_embeddings=4096, type='yarn'),
      quantization_config=dict(activation_scheme='dynamic', fmt='e4m3', quant_method='fp8',
                               weight_block_size=[128, 128]))
  assert convert.config_from_hf(released) == ModelConfig()


@pytest.mark.parametrize('params', [
    {'mscale': 0.707, 'mscale_all_dim': 1.0}, {'mscale': 1.0, 'mscale_all_dim': 1.0}, {},
    {'mscale': 0.707}, {'mscale_all_dim': 0.8}, {'mscale': 0.0, 'mscale_all_dim': 1.0},
    {'attention_factor': 1.3, 'mscale_all_dim': 1.0}, {'factor': 1.0},
])
def test_yarn_scales_match_hf(params):
  """Frequencies, cos/sin scale and softmax scale equal HF's for every way mscale can be given."""
  rope_parameters = {**YARN, 'factor': 40.0, 'original_max_position_embeddings': 4096,
                     'rope_theta': 10_000.0, **params}
  hf_config = DeepseekV3Config(**{**BASE, 'qk_rope_head_dim': 64,
                                  'max_position_embeddings': int(4096 * rope_parameters['factor']),
                                  'rope_parameters': rope_parameters})
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS['yarn'](hf_config)
  cfg = convert.config_from_hf(hf_config.to_dict())
  np.testing.assert_allclose(rope.inv_frequencies(cfg), inv_freq.numpy(), rtol=1e-6)
  assert math.isclose(rope.cos_sin_scale(cfg), attention_factor, rel_tol=1e-12)
  hf_scale = hf_v3.yarn_apply_mscale(hf_config.rope_parameters, hf_config.qk_head_dim ** -0.5)
  assert math.isclose(rope.softmax_scale(cfg), hf_scale, rel_tol=1e-12)


def test_load_with_mesh(saved):
  """Basic placement: each parameter lands with the sharding its logical axes ask for."""
  mesh = jax.make_mesh((2, 4), ('data', 'expert'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rules = (('expert', 'expert'), ('vocab', 'data')) + tuple(  # the rest replicated
      (name, None) for name in ('embed', 'heads', 'head_dim', 'q_latent', 'kv_latent', 'rope',
                                'mlp', 'norm', 'mtp_in', 'layers'))
  _, plain = convert.load_pretrained(saved)
  _, sharded = convert.load_pretrained(saved, mesh=mesh, rules=rules)
  w_gate = sharded.moe_layers.ffn.w_gate.get_value()  # [L_moe, E, D, F], the MoE layers stacked
  assert w_gate.sharding.spec[:2] == (None, 'expert') and len(w_gate.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(w_gate), np.asarray(plain.moe_layers.ffn.w_gate[...]))
  head = sharded.head.get_value()
  assert head.sharding.spec == jax.sharding.PartitionSpec(None, 'data')
  np.testing.assert_array_equal(np.asarray(head), np.asarray(plain.head[...]))
  # Running the sharded forward pass is the sharding issue's test, not this one.

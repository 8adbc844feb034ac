"""Hugging Face DeepSeek-V3 (and V2) checkpoints -> our model: config, tensor names and layouts.

HF keeps `nn.Linear` weights as [out, in] with the heads fused into `out`; we keep einsum layouts
[in, ..., out] with heads as their own axis. `tensor_plan` lists, for every tensor of a checkpoint,
where it goes and how it is reshaped; `load_pretrained` checks the whole plan against the file
headers (missing, unknown, wrong shape) before it reads a byte, then creates each parameter with
its sharding from the blocks this process's devices hold, reading from the memory-mapped files
only those blocks (`jax.make_array_from_single_device_arrays`), dequantizing FP8 weights (128x128
`weight_scale_inv` blocks) on the way, or keeping them in E4M3 with their scales (`keep_fp8`).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from deepseek_jax import fp8
from deepseek_jax import model as model_lib
from deepseek_jax import sharding as sharding_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.convert import safetensors_io
from deepseek_jax.layers import param as param_lib
from deepseek_jax.layers import rope
from deepseek_jax.layers.block import is_moe_layer

SCALE_SUFFIX = '_scale_inv'
FP8 = safetensors_io.DTYPES['F8_E4M3']
TOPK_METHODS = {'noaux_tc': True, 'greedy': False, 'group_limited_greedy': False}  # -> router bias


# ---- config ------------------------------------------------------------------------------------

def _reject(key: str, value, why: str):
  raise ValueError(f'config.json {key}={value!r}: {why}')


def _rope_from_hf(hf: dict) -> dict:
  """Our rope fields from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
  key = 'rope_parameters' if hf.get('rope_parameters') else 'rope_scaling'
  params = dict(hf.get(key) or {})
  if any(isinstance(v, dict) for v in params.values()):
    _reject(key, params, 'per-layer-type rope parameters are not implemented')
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10_000.0)))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind in ('default', None):
    return dict(rope_theta=theta, rope_factor=1.0)
  if kind != 'yarn':
    _reject(f'{key}.rope_type', kind, "only 'default' and 'yarn' rope are implemented")
  if params.get('truncate', True) is False:
    _reject(f'{key}.truncate', False, 'only the truncated (floor/ceil) YaRN ramp is implemented')
  max_pos = hf.get('max_position_embeddings', 163_840)
  original = params.get('original_max_position_embeddings') or max_pos  # HF's setdefault
  factor = params.get('factor') or max_pos / original                   # HF's fallback
  mscale, mscale_all_dim = params.get('mscale'), params.get('mscale_all_dim')
  attention_factor = params.get('attention_factor')
  # HF scales the softmax by yarn_mscale(f, mscale_all_dim)^2 iff mscale_all_dim is truthy, and
  # cos/sin by `attention_factor`, which defaults to yarn_mscale(f, mscale) / yarn_mscale(f,
  # mscale_all_dim) only when both keys are truthy, else to yarn_mscale(f, 1). We scale cos/sin by
  # yarn_mscale(f, m) / yarn_mscale(f, m_all), so solve for the m that gives HF's factor.
  m_all = float(mscale_all_dim or 0.0)
  log_f = 0.1 * math.log(factor) if factor > 1 else 0.0
  if attention_factor is not None:
    if not log_f and attention_factor != 1:
      _reject(f'{key}.attention_factor', attention_factor, 'needs factor > 1 to be expressed')
    m = (attention_factor * rope.yarn_mscale(factor, m_all) - 1) / log_f if log_f else 1.0
  elif mscale and m_all:
    m = float(mscale)
  elif m_all:
    m = 1.0 + m_all + m_all * log_f  # yarn_mscale(f, m) = yarn_mscale(f, 1) * yarn_mscale(f, m_all)
  else:
    m = 1.0
  return dict(rope_theta=theta, rope_factor=float(factor), rope_original_max_position=int(original),
              rope_beta_fast=float(params.get('beta_fast') or 32),
              rope_beta_slow=float(params.get('beta_slow') or 1),
              rope_mscale=m, rope_mscale_all_dim=m_all)


def config_from_hf(hf: dict, *, mtp_depth: int | None = None) -> ModelConfig:
  """A `ModelConfig` from a DeepSeek-V3 / V2 `config.json` dict.

  `mtp_depth` defaults to the MTP layers the config declares; `load_pretrained` passes the number
  actually present in the weights (HF's `save_pretrained` declares one but writes none).
  """
  model_type = hf.get('model_type', 'deepseek_v3')
  for key, default, wanted in (('hidden_act', 'silu', 'silu'), ('attention_bias', False, False),
                               ('mlp_bias', False, False), ('rope_interleave', True, True),
                               ('tie_word_embeddings', False, False), ('moe_layer_freq', 1, 1)):
    if hf.get(key, default) != wanted:
      _reject(key, hf[key], f'only {wanted!r} is implemented')
  heads = hf['num_attention_heads']
  if hf.get('num_key_value_heads') not in (None, heads):
    _reject('num_key_value_heads', hf['num_key_value_heads'],
            f'MLA expands the latent to every head: must equal num_attention_heads={heads}')
  topk_method = hf.get('topk_method', 'noaux_tc' if model_type == 'deepseek_v3' else 'greedy')
  if topk_method not in TOPK_METHODS:
    _reject('topk_method', topk_method, f'expected one of {sorted(TOPK_METHODS)}')
  n_group, topk_group = hf.get('n_group') or 1, hf.get('topk_group') or 1
  if topk_method == 'greedy':  # V2's plain top-K: no group limit whatever n_group says
    n_group = topk_group = 1
  num_layers = hf['num_hidden_layers']
  n_routed = hf.get('n_routed_experts')
  if mtp_depth is None:
    mtp_depth = hf.get('num_nextn_predict_layers', hf.get('num_mtp_layers', 0)) or 0
  return ModelConfig(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'], num_layers=num_layers,
      num_heads=heads, qk_nope_head_dim=hf['qk_nope_head_dim'],
      qk_rope_head_dim=hf['qk_rope_head_dim'], v_head_dim=hf['v_head_dim'],
      q_lora_rank=hf.get('q_lora_rank'), kv_lora_rank=hf['kv_lora_rank'],
      intermediate_size=hf['intermediate_size'],
      moe_intermediate_size=hf['moe_intermediate_size'],
      # V2: n_routed_experts null means no MoE layer at all
      first_k_dense=hf.get('first_k_dense_replace', 0) if n_routed else num_layers,
      n_shared_experts=hf.get('n_shared_experts') or 0, n_routed_experts=n_routed or 0,
      num_experts_per_tok=hf.get('num_experts_per_tok') or 1, n_group=n_group,
      topk_group=topk_group, routed_scaling_factor=float(hf.get('routed_scaling_factor', 1.0)),
      scoring_func=hf.get('scoring_func', 'softmax' if model_type == 'deepseek_v2' else 'sigmoid'),
      norm_topk_prob=bool(hf.get('norm_topk_prob', model_type != 'deepseek_v2')),
      use_router_bias=TOPK_METHODS[topk_method], rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      max_position_embeddings=hf.get('max_position_embeddings', 163_840), mtp_depth=mtp_depth,
      **_rope_from_hf(hf))  # init_std stays the paper's 0.006: the released config says 0.02


def config_to_hf(cfg: ModelConfig) -> dict:
  """The inverse of `config_from_hf`: a `DeepseekV3Config(**d)` dict. HF's DeepseekV3 router is
  always sigmoid with the bias, so only such configs give an HF model computing what ours does."""
  rope_parameters = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.yarn:
    rope_parameters.update(
        rope_type='yarn', factor=cfg.rope_factor,
        original_max_position_embeddings=cfg.rope_original_max_position,
        beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, mscale=cfg.rope_mscale,
        mscale_all_dim=cfg.rope_mscale_all_dim)
    if not (cfg.rope_mscale and cfg.rope_mscale_all_dim):  # HF's default differs: be explicit
      rope_parameters['attention_factor'] = rope.cos_sin_scale(cfg)
  topk_method = 'noaux_tc' if cfg.use_router_bias else (
      'group_limited_greedy' if cfg.n_group > 1 else 'greedy')
  return dict(
      model_type='deepseek_v3', architectures=['DeepseekV3ForCausalLM'],
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
      qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
      v_head_dim=cfg.v_head_dim, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
      intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
      first_k_dense_replace=cfg.first_k_dense, n_shared_experts=cfg.n_shared_experts,
      n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
      n_group=cfg.n_group, topk_group=cfg.topk_group, topk_method=topk_method,
      routed_scaling_factor=cfg.routed_scaling_factor, scoring_func=cfg.scoring_func,
      norm_topk_prob=cfg.norm_topk_prob, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope_parameters,
      num_nextn_predict_layers=cfg.mtp_depth, initializer_range=cfg.init_std, hidden_act='silu',
      attention_bias=False, rope_interleave=True, tie_word_embeddings=False)


# ---- tensor plan -------------------------------------------------------------------------------

Path = tuple  # a leaf path of the split model state, e.g. ('layers', 3, 'attn', 'w_uq')


class Rule(typing.NamedTuple):
  """Sources -> targets. A target path ending in an int j is row j of that parameter (routed
  experts: one rule per expert). `convert` gets memory-mapped (lazy) arrays and returns views:
  the loader reads only the slices of them that its devices hold. It may only slice, transpose,
  reshape and split (no stack, no arithmetic): `convert.export` inverts it with
  `jax.linear_transpose`."""
  sources: dict[str, tuple[int, ...]]  # HF tensor name -> expected shape
  targets: tuple[Path, ...]
  convert: typing.Callable[..., tuple[np.ndarray, ...]]  # sources in order -> targets in order
  # For weights kept in FP8: their scales, one per source row (`_kept_scale_rules`), -> the
  # targets' `_scale`s. None: `convert` itself, right wherever the input dim stays one axis.
  scale_convert: typing.Callable[..., tuple[np.ndarray, ...]] | None = None


def _linear(name: str, out_dim: int, in_dim: int, target: Path) -> Rule:
  return Rule({name: (out_dim, in_dim)}, (target,), lambda w: (w.T,))


def _as_is(name: str, shape: tuple[int, ...], target: Path) -> Rule:
  return Rule({name: shape}, (target,), lambda w: (w,))


def _split_heads(w: np.ndarray, heads: int, sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
  """[N * sum(sizes), in] with rows head-major -> one [in, N, size] per part of each head."""
  w = w.reshape(heads, sum(sizes), w.shape[-1])
  return tuple(p.transpose(2, 0, 1) for p in np.split(w, np.cumsum(sizes)[:-1], axis=1))


def _attention(cfg: ModelConfig, hf: str, ours: Path) -> list[Rule]:
  D, N, H, R, U, C = (cfg.hidden_size, cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                      cfg.v_head_dim, cfg.kv_lora_rank)
  split_q = lambda w: _split_heads(w, N, (H, R))  # each head's rows: H nope, then R rope
  if cfg.q_lora_rank is None:
    rules = [Rule({f'{hf}.q_proj.weight': (N * (H + R), D)}, (ours + ('w_q',), ours + ('w_qr',)),
                  split_q)]
  else:
    Q = cfg.q_lora_rank
    rules = [_linear(f'{hf}.q_a_proj.weight', Q, D, ours + ('w_dq',)),
             _as_is(f'{hf}.q_a_layernorm.weight', (Q,), ours + ('q_norm', 'weight')),
             Rule({f'{hf}.q_b_proj.weight': (N * (H + R), Q)},
                  (ours + ('w_uq',), ours + ('w_qr',)), split_q)]
  return rules + [
      # rows: the C latent dims, then the R dims of the one rope key shared by all heads
      Rule({f'{hf}.kv_a_proj_with_mqa.weight': (C + R, D)}, (ours + ('w_dkv',), ours + ('w_kr',)),
           lambda w: (w[:C].T, w[C:].T)),
      _as_is(f'{hf}.kv_a_layernorm.weight', (C,), ours + ('kv_norm', 'weight')),
      Rule({f'{hf}.kv_b_proj.weight': (N * (H + U), C)}, (ours + ('w_uk',), ours + ('w_uv',)),
           lambda w: _split_heads(w, N, (H, U))),  # each head's rows: H key dims, then U values
      # columns head-major (n * U + u) -> [N, U, D]; kept in FP8, the scales of its 128-column
      # blocks of N U go [ceil(N U / 128), D]
      Rule({f'{hf}.o_proj.weight': (D, N * U)}, (ours + ('w_o',),),
           lambda w: (w.reshape(D, N, U).transpose(1, 2, 0),), lambda scale: (scale.T,)),
  ]


def _swiglu(hf: str, ours: Path, D: int, F: int) -> list[Rule]:
  return [_linear(f'{hf}.gate_proj.weight', F, D, ours + ('w_gate',)),
          _linear(f'{hf}.up_proj.weight', F, D, ours + ('w_up',)),
          _linear(f'{hf}.down_proj.weight', D, F, ours + ('w_down',))]


def _moe(cfg: ModelConfig, hf: str, ours: Path, names: set[str]) -> list[Rule]:
  D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
  experts = (ours + ('w_gate',), ours + ('w_up',), ours + ('w_down',))
  rules = [_linear(f'{hf}.gate.weight', E, D, ours + ('router_kernel',))]
  if cfg.use_router_bias:
    rules.append(_as_is(f'{hf}.gate.e_score_correction_bias', (E,), ours + ('router_bias',)))
  # One rule per expert, each filling row j of the three [E, ...] tensors, so that a process
  # reads only the experts its devices hold.
  if f'{hf}.experts.gate_up_proj' in names:
    # transformers >= 5 fused layout: gate_up [E, 2F, D] (gate rows, then up), down [E, D, F];
    # the sources are memory-mapped, so taking row j reads only expert j's bytes
    sources = {f'{hf}.experts.gate_up_proj': (E, 2 * F, D), f'{hf}.experts.down_proj': (E, D, F)}
    for j in range(E):
      rules.append(Rule(sources, tuple(t + (j,) for t in experts),
                        lambda gate_up, down, j=j: (gate_up[j, :F].T, gate_up[j, F:].T,
                                                    down[j].T)))
  else:  # one nn.Linear per expert, as released and as save_pretrained writes
    for j in range(E):
      rules.append(Rule({f'{hf}.experts.{j}.gate_proj.weight': (F, D),
                         f'{hf}.experts.{j}.up_proj.weight': (F, D),
                         f'{hf}.experts.{j}.down_proj.weight': (D, F)},
                        tuple(t + (j,) for t in experts), lambda *w: tuple(x.T for x in w)))
  if cfg.n_shared_experts:
    rules += _swiglu(f'{hf}.shared_experts', ours + ('shared_experts',), D,
                     F * cfg.n_shared_experts)
  return rules


def _block(cfg: ModelConfig, index: int, ours: Path, names: set[str]) -> list[Rule]:
  hf, D = f'model.layers.{index}', cfg.hidden_size
  rules = [_as_is(f'{hf}.input_layernorm.weight', (D,), ours + ('attn_norm', 'weight')),
           _as_is(f'{hf}.post_attention_layernorm.weight', (D,), ours + ('ffn_norm', 'weight'))]
  rules += _attention(cfg, f'{hf}.self_attn', ours + ('attn',))
  if is_moe_layer(cfg, index):  # MTP blocks (index >= num_layers) are MoE, in HF too
    return rules + _moe(cfg, f'{hf}.mlp', ours + ('ffn',), names)
  return rules + _swiglu(f'{hf}.mlp', ours + ('ffn',), D, cfg.intermediate_size)


def tensor_plan(cfg: ModelConfig, names: set[str]) -> tuple[list[Rule], dict[str, tuple]]:
  """Every rule that fills the model, and the tolerated extra tensors (name -> expected shape):
  the MTP layers' copies of the embedding and head, which are the main model's."""
  V, D, L = cfg.vocab_size, cfg.hidden_size, cfg.num_layers
  rules = [_as_is('model.embed_tokens.weight', (V, D), ('embed',)),
           _linear('lm_head.weight', V, D, ('head',)),
           _as_is('model.norm.weight', (D,), ('norm', 'weight'))]
  for i in range(L):
    rules += _block(cfg, i, ('layers', i), names)
  copies = {}
  for k in range(cfg.mtp_depth):
    hf, ours = f'model.layers.{L + k}', ('mtp', k)
    rules += [_as_is(f'{hf}.enorm.weight', (D,), ours + ('enorm', 'weight')),
              _as_is(f'{hf}.hnorm.weight', (D,), ours + ('hnorm', 'weight')),
              # input columns: [enorm(embedding); hnorm(hidden)]
              _linear(f'{hf}.eh_proj.weight', D, 2 * D, ours + ('eh_proj',)),
              _as_is(f'{hf}.shared_head.norm.weight', (D,), ours + ('norm', 'weight'))]
    rules += _block(cfg, L + k, ours + ('block',), names)
    copies.update({f'{hf}.embed_tokens.weight': (V, D), f'{hf}.shared_head.head.weight': (V, D)})
  return rules, copies


# ---- loading -----------------------------------------------------------------------------------

def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
  """The `weight_scale_inv` grid of a [..., out, in] weight: one scale per block, edges included."""
  return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128),
               name: str = 'weight') -> np.ndarray:
  """FP8 w [..., out, in] times its per-block scale, in float32; edge blocks are cropped."""
  out_dim, in_dim = w.shape[-2:]
  if scale_inv.shape != scale_shape(w.shape, block):
    raise ValueError(f'{name}{SCALE_SUFFIX}: shape {scale_inv.shape}, expected '
                     f'{scale_shape(w.shape, block)} for {name} {w.shape} in {block} blocks')
  scale = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block[0], axis=-2), block[1],
                    axis=-1)[..., :out_dim, :in_dim]
  return w.astype(np.float32) * scale


def _check(ckpt: safetensors_io.Checkpoint, rules: list[Rule], copies: dict,
           block: tuple[int, int], where: str):
  """Missing, unknown and mis-shaped tensors, all before anything is read."""
  expected = {name: shape for rule in rules for name, shape in rule.sources.items()}
  names = ckpt.names()
  missing = sorted(set(expected) - names)
  if missing:
    raise ValueError(f'{where}: missing tensor(s) {missing[:8]}' + (
        f' and {len(missing) - 8} more' if len(missing) > 8 else ''))
  scales = {n for n in names if n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in expected}
  unknown = sorted(names - set(expected) - set(copies) - scales)
  if unknown:
    listed = ', '.join(f'{n!r} ({ckpt.file_of(n)})' for n in unknown[:8])
    raise ValueError(f'{where}: unknown tensor(s) {listed}' + (
        f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''))
  for name, shape in list(expected.items()) + [(n, s) for n, s in copies.items() if n in names]:
    if ckpt.shape(name) != tuple(shape):
      raise ValueError(f'{where}: tensor {name!r} ({ckpt.file_of(name)}) has shape '
                       f'{ckpt.shape(name)}, expected {tuple(shape)}')
    scale = name + SCALE_SUFFIX
    if (ckpt.dtype(name) == FP8) != (scale in names):
      raise ValueError(f'{where}: tensor {name!r} ({ckpt.file_of(name)}) is {ckpt.dtype(name)} '
                       f'{"with" if scale in names else "without"} a {SCALE_SUFFIX} sibling; '
                       'FP8 weights, and only they, carry one')
    if scale in names and ckpt.shape(scale) != scale_shape(shape, block):
      raise ValueError(f'{where}: tensor {scale!r} ({ckpt.file_of(scale)}) has shape '
                       f'{ckpt.shape(scale)}, expected {scale_shape(shape, block)}')


def _fp8_block(quantization: dict | None) -> tuple[int, int]:
  """The FP8 scale block of a `quantization_config` (DeepSeek's: fp8, e4m3, [128, 128])."""
  quantization = quantization or {}
  method = quantization.get('quant_method', 'fp8')
  if method != 'fp8':
    _reject('quantization_config.quant_method', method, "only 'fp8' (block-scaled E4M3, as "
            'DeepSeek-V3 is released) is implemented')
  if quantization.get('fmt', 'e4m3') != 'e4m3':
    _reject('quantization_config.fmt', quantization['fmt'], "only 'e4m3' is implemented")
  block = tuple(quantization.get('weight_block_size') or (128, 128))
  if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
    _reject('quantization_config.weight_block_size', list(block), 'expected two positive ints')
  return block


def mtp_layers_in(names: set[str], num_layers: int) -> int:
  """MTP depth present in a checkpoint: layers numbered num_layers, num_layers + 1, ..."""
  indices = {int(m.group(1)) for n in names if (m := re.match(r'model\.layers\.(\d+)\.', n))}
  extra = [i for i in indices if i >= num_layers]
  return max(extra) - num_layers + 1 if extra else 0  # gaps show up as missing tensors


class _Piece(typing.NamedTuple):
  """One rule's k-th output, which fills `lead` (layer index in a stack, expert row, or both,
  in that order; () for a whole parameter) of a parameter."""
  lead: tuple[int, ...]
  rule: Rule
  k: int


class _Sources:
  """The checkpoint's tensors as the rules' `convert` sees them: memory maps, except FP8
  weights, which are dequantized whole (one tensor at a time; the last few are cached, since
  every local shard of a split parameter reads the same one). The FP8 weights named in `kept`
  stay memory-mapped E4M3, and their `_scale_inv` come with each block's scale repeated over its
  rows ([out, in / block]), which the rules then cut as they cut the weight."""

  def __init__(self, ckpt: safetensors_io.Checkpoint, block: tuple[int, int],
               kept: frozenset[str] = frozenset(), cached: int = 2):
    self.ckpt, self.block, self.kept, self.cached = ckpt, block, kept, cached
    self._made: dict[str, np.ndarray] = {}

  def __call__(self, name: str) -> np.ndarray:
    w = self.ckpt.get(name)
    if name in self.kept:
      return w
    if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.kept:
      rows = self.ckpt.shape(name[:-len(SCALE_SUFFIX)])[-2]
      return self._cache(name, lambda: np.repeat(np.asarray(w, np.float32), self.block[0],
                                                 axis=-2)[..., :rows, :])
    if w.dtype != FP8:
      return w
    return self._cache(name, lambda: dequantize(w, self.ckpt.get(name + SCALE_SUFFIX), self.block,
                                                name))

  def _cache(self, name: str, make) -> np.ndarray:
    if name not in self._made:
      if len(self._made) >= self.cached:
        self._made.pop(next(iter(self._made)))
      self._made[name] = make()
    return self._made[name]


def _scale_target(target: Path) -> Path:
  """The `_scale` sibling of a plan target (row j of it for a routed expert's row j)."""
  if isinstance(target[-1], int):
    return target[:-2] + (target[-2] + '_scale', target[-1])
  return target[:-1] + (target[-1] + '_scale',)


def _kept_scale_rules(cfg: ModelConfig, plan: list[Rule], leaves: dict,
                      ckpt: safetensors_io.Checkpoint, block: tuple[int, int],
                      where: str) -> tuple[list[Rule], frozenset[str]]:
  """For a model with `fp8_weights`: the rules filling the `_scale` of every weight kept in E4M3,
  and the checkpoint tensors those weights come from (which must be FP8)."""
  if block[1] != fp8.quant.KEPT_BLOCK[0]:
    raise ValueError(f'{where}: keep_fp8 needs weight_block_size [*, {fp8.quant.KEPT_BLOCK[0]}] '
                     f'(the FP8 GEMM scales {fp8.quant.KEPT_BLOCK[0]} input rows at a time), got '
                     f'{list(block)}')
  rules, kept = [], set()
  for rule in plan:
    targets = tuple(_scale_target(t) for t in rule.targets)
    if target_location(cfg, targets[0])[0] not in leaves:
      continue  # not kept in FP8 (embedding, head, router, norms, eh_proj)
    for name in rule.sources:
      if ckpt.dtype(name) != FP8:
        raise ValueError(f'{where}: keep_fp8: tensor {name!r} ({ckpt.file_of(name)}) is '
                         f'{ckpt.dtype(name)}, not FP8 with a {SCALE_SUFFIX}; keeping weights in '
                         'FP8 needs a checkpoint quantized as DeepSeek-V3 is released '
                         '(or load with keep_fp8=False)')
    kept.update(rule.sources)
    sources = {name + SCALE_SUFFIX: scale_shape(shape, block)
               for name, shape in rule.sources.items()}
    rules.append(Rule(sources, targets, rule.scale_convert or rule.convert))
  return rules, frozenset(kept)


def target_location(cfg: ModelConfig, target: Path) -> tuple[Path, tuple[int, ...]]:
  """Where a plan target lives in `cfg`'s layout: (parameter path, leading indices into it: the
  layer's row of a stack, then the routed expert's row; () for a whole parameter)."""
  path, lead = target, ()
  if isinstance(path[-1], int):  # row j of a routed-expert tensor
    path, lead = path[:-1], (path[-1],)
  if path[0] == 'layers':  # the plan names layers one by one; a stack holds them in rows
    prefix, index = model_lib.layer_location(cfg, path[1])
    path = prefix + path[2:]
    lead = lead if index is None else (index,) + lead
  return path, lead


def _pieces(cfg: ModelConfig, plan: list[Rule],
            leaves: dict[Path, typing.Any]) -> dict[Path, list[_Piece]]:
  """Every parameter's pieces; raises naming a plan target the model lacks or a parameter no
  rule fills (bugs of the plan, not of the checkpoint), before anything is read."""
  pieces: dict[Path, list[_Piece]] = {}
  for rule in plan:
    for k, target in enumerate(rule.targets):
      path, lead = target_location(cfg, target)
      if path not in leaves:
        raise ValueError(f'load_pretrained: the plan targets {target}, which the model lacks')
      pieces.setdefault(path, []).append(_Piece(lead, rule, k))
  unfilled = sorted(set(leaves) - set(pieces), key=str)
  if unfilled:
    raise ValueError(f'load_pretrained: no checkpoint tensor fills {unfilled[:8]}')
  return pieces


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
  """An uninitialised array at a 64-byte aligned address, which a CPU device adopts without a
  copy (`jax.device_put`; measured: an unaligned one is copied, doubling the host peak)."""
  dtype = np.dtype(dtype)
  size = math.prod(shape) * dtype.itemsize
  raw = np.empty(size + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + size].view(dtype).reshape(shape)


def _fill(path: Path, shape: tuple[int, ...], dtype, bounds: tuple[tuple[int, int], ...],
          pieces: list[_Piece], sources: _Sources) -> np.ndarray:
  """The block `bounds` ([start, stop) per dimension) of parameter `path`, read from only the
  pieces, and the parts of them, that it covers."""
  out = _aligned_empty(tuple(stop - start for start, stop in bounds), dtype)
  covered = 0
  for piece in pieces:
    n = len(piece.lead)
    if not all(start <= i < stop for i, (start, stop) in zip(piece.lead, bounds)):
      continue
    value = piece.rule.convert(*[sources(name) for name in piece.rule.sources])[piece.k]
    if value.shape != shape[n:]:  # a plan bug, not the checkpoint's
      raise ValueError(f'{path}{list(piece.lead)}: {value.shape} from '
                       f'{list(piece.rule.sources)[:3]}, model expects {shape[n:]}')
    rest = tuple(slice(start, stop) for start, stop in bounds[n:])
    out[tuple(i - start for i, (start, _) in zip(piece.lead, bounds))] = value[rest]
    covered += 1
  if covered != math.prod(stop - start for start, stop in bounds[:len(pieces[0].lead)]):
    raise ValueError(f'load_pretrained: {path} block {bounds} is not filled exactly once')
  return out


def load_pretrained(path, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                    scan_layers: bool = True, param_dtype=jnp.float32, keep_fp8: bool = False,
                    progress: bool = False) -> tuple[ModelConfig, model_lib.DeepSeekV3]:
  """Loads a `save_pretrained` directory of DeepseekV3ForCausalLM (FP8 or not), without
  initialising the model.

  Every parameter is created with its sharding (`rules`, by default `sharding.rules()`, over
  `mesh`; on the first local device without a mesh) from the blocks its addressable devices
  hold, each block read from the memory-mapped files alone: a process reads only its own slices
  (its own experts' tensors, where experts are split) and holds, besides what it ends up with,
  one parameter's blocks and one or two dequantized FP8 tensors.
  Floating parameters become `param_dtype` (float32 to train, bfloat16 to serve); router biases
  stay float32. The decoder layers come stacked (`ModelConfig.scan_layers`) unless
  `scan_layers=False`. `progress` shows a bar over the parameters' bytes.

  `keep_fp8`: the weights that precision='fp8' multiplies in FP8 (MLA's projections, the FFNs'
  and experts') stay the checkpoint's E4M3 values, each with its block scales repeated per column
  (`fp8.QuantizedWeight`): the model comes with `precision='fp8'` and `fp8_weights=True`, for
  inference, in a quarter of float32's bytes. Those tensors must be FP8 in the checkpoint; any
  other FP8 tensor is dequantized as usual.
  """
  directory = pathlib.Path(path)
  if not (directory / 'config.json').is_file():
    raise FileNotFoundError(f'load_pretrained: {directory / "config.json"} not found '
                            '(expected a save_pretrained directory)')
  hf = json.loads((directory / 'config.json').read_text())
  ckpt = safetensors_io.Checkpoint(directory)
  names = ckpt.names()
  cfg = config_from_hf(hf, mtp_depth=mtp_layers_in(names, hf['num_hidden_layers']))
  cfg = cfg.replace(scan_layers=scan_layers)
  if keep_fp8:
    cfg = cfg.replace(precision='fp8', fp8_weights=True)
  block = _fp8_block(hf.get('quantization_config'))
  plan, copies = tensor_plan(cfg, names)
  _check(ckpt, plan, copies, block, str(directory))

  graphdef, state = nnx.split(model_lib.abstract(cfg))
  leaves = dict(nnx.to_flat_state(state))
  kept = frozenset()
  if keep_fp8:
    scale_rules, kept = _kept_scale_rules(cfg, plan, leaves, ckpt, block, str(directory))
    plan = plan + scale_rules
  pieces = _pieces(cfg, plan, leaves)
  if mesh is not None:  # a mesh axis splits at most one dimension of a parameter
    shardings = {p: s.get_value() for p, s in nnx.to_flat_state(
        sharding_lib.variable_shardings(state, mesh, rules or sharding_lib.rules()))}
  else:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = {p: one for p in leaves}
  sources = _Sources(ckpt, block, kept)
  dtypes = {p: jnp.dtype(param_dtype) if param_lib.follows_param_dtype(v) else v.get_value().dtype
            for p, v in leaves.items()}
  total = sum(math.prod(v.get_value().shape) * dtypes[p].itemsize for p, v in leaves.items())
  bar = tqdm.tqdm(total=total, unit='B', unit_scale=True, desc='load_pretrained',
                  disable=not progress)
  filled = {}
  for path, variable in leaves.items():
    shape, sharding = variable.get_value().shape, shardings[path]
    where = {device: tuple(s.indices(n)[:2] for s, n in zip(index, shape))
             for device, index in sharding.addressable_devices_indices_map(shape).items()}
    uses = collections.Counter(where.values())
    blocks, arrays = {}, []
    for device, bounds in where.items():
      if bounds not in blocks:  # replicas of a block are read once
        blocks[bounds] = _fill(path, shape, dtypes[path], bounds, pieces[path], sources)
      arrays.append(jax.device_put(blocks[bounds], device))
      uses[bounds] -= 1
      if not uses[bounds]:  # the device has it (a CPU device adopts it): let go of ours
        del blocks[bounds]
    filled[path] = variable.replace(
        jax.make_array_from_single_device_arrays(shape, sharding, arrays))
    bar.update(math.prod(shape) * dtypes[path].itemsize)
  bar.close()
  return cfg, nnx.merge(graphdef, nnx.from_flat_state(filled))

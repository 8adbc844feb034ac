"""The frozen, validated model configuration.

Every experiment config (`experiments/configs/*.py`) holds a `model` ConfigDict; it becomes a
`ModelConfig` exactly once, through `ModelConfig.from_dict`, and every impossible combination of
hyperparameters fails there with a `ValueError` that names the field and its value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SCORING_FUNCS = ('sigmoid', 'softmax')
DTYPES = ('float32', 'bfloat16')
MOE_MATMULS = ('auto', 'ragged_dot', 'blocked')
PRECISIONS = ('bf16', 'fp8')
KERNELS = ('auto', 'pallas', 'xla')
ATTENTIONS = ('auto', 'dense', 'blockwise')
REMAT_POLICIES = ('none', 'full', 'save_attention', 'offload_inputs')  # layers/remat.py
# Fields that choose how the model computes, not what its parameters are (shapes, count, meaning
# and the float32 masters are the same under each value): a checkpoint resumes across them.
IMPLEMENTATION_FIELDS = ('dtype', 'moe_matmul', 'precision', 'mla_decode_kernel',
                         'fp8_matmul_kernel', 'remat', 'attention')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3 hyperparameters; defaults are the released 671B model (arXiv 2412.19437)."""

  vocab_size: int = 129_280                  # V
  hidden_size: int = 7168                    # D
  num_layers: int = 61                       # L (main model, without MTP)
  num_heads: int = 128                       # N
  qk_nope_head_dim: int = 128                # H
  qk_rope_head_dim: int = 64                 # R, decoupled rope part of q and the shared rope key
  v_head_dim: int = 128                      # U, value head dim
  q_lora_rank: int | None = 1536             # Q; None = one full-rank query projection (V2-Lite)
  kv_lora_rank: int = 512                    # C
  intermediate_size: int = 18_432            # F of the dense FFN layers
  moe_intermediate_size: int = 2048          # F of every routed and shared expert
  first_k_dense: int = 3                     # the first layers use a dense FFN instead of MoE
  n_shared_experts: int = 1
  n_routed_experts: int = 256                # E
  num_experts_per_tok: int = 8               # K
  n_group: int = 8                           # G, expert groups (= nodes)
  topk_group: int = 4                        # M, groups a token may route to
  routed_scaling_factor: float = 2.5
  scoring_func: str = 'sigmoid'              # 'sigmoid' (V3) or 'softmax' (V2)
  norm_topk_prob: bool = True                # normalise gates over the chosen K
  use_router_bias: bool = True               # aux-loss-free bias (V3's noaux_tc); picks experts only
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  rope_factor: float = 40.0                  # YaRN scale factor; 1.0 turns YaRN off
  rope_original_max_position: int = 4096
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float = 1.0
  rope_mscale_all_dim: float = 1.0
  max_position_embeddings: int = 163_840
  mtp_depth: int = 1                         # P, Multi-Token Prediction modules
  init_std: float = 0.006
  dtype: str = 'float32'                     # activation dtype; params stay float32
  moe_matmul: str = 'auto'                   # grouped expert matmul: 'auto' | 'ragged_dot' | 'blocked'
  # 'bf16': every matmul in the activation dtype. 'fp8': MLA projections and every expert,
  # shared-expert and dense FFN matmul in E4M3 with 1x128 / 128x128 scaling (V3 §3.3); the
  # embedding, output head, router, norms and attention core keep the activation dtype.
  precision: str = 'bf16'
  # The weights that precision='fp8' multiplies in FP8 (above) stored as E4M3 values with float32
  # scales, one per column of each 128-row block (`fp8.QuantizedWeight`; a released FP8
  # checkpoint's blocks, `convert.hf.load_pretrained(keep_fp8=True)`): a quarter of float32's
  # bytes. Inference only (E4M3 values have no gradient); needs precision='fp8'.
  fp8_weights: bool = False
  # Pallas kernels (`kernels/`), one switch each: 'pallas' always (interpret mode on CPU; Triton
  # or Mosaic by the platform lowered for, so AOT compilation for a TPU takes the TPU kernel),
  # 'xla' never (the XLA paths), 'auto' where the host and shapes fit: a GPU (FP8: compute
  # capability >= 8.9) or a TPU host (`kernels.mla_decode.supported`).
  mla_decode_kernel: str = 'auto'            # absorbed attention over the latent cache (decode)
  fp8_matmul_kernel: str = 'auto'            # the block-scaled FP8 GEMM under precision='fp8'
  # Attention without a cache (training, prefill; layers/attention.py): 'dense' keeps the
  # [B, N, T, S] probabilities for its written-out backward, 'blockwise' recomputes them per block
  # (memory grows with T, not T²), 'auto' dense when lowered for a CPU and blockwise elsewhere.
  attention: str = 'auto'
  # What each decoder block's backward pass recomputes instead of keeping (layers/remat.py):
  # 'none', 'full', 'save_attention' (keeps MLA's projections), 'offload_inputs' (block inputs in
  # host memory). Training only; decoding with a cache never rematerializes.
  remat: str = 'none'
  # The decoder layers as two stacks of parameters with a leading `layers` axis (the dense prefix,
  # then the MoE layers), each run by one `jax.lax.scan` (model.py): compile time and program size
  # no longer grow with depth. False keeps one module per layer. The two layouts' parameter trees
  # differ, so a checkpoint restores only into the layout that wrote it (`model.stack_layers` /
  # `unstack_layers` convert).
  scan_layers: bool = True

  def __post_init__(self):
    _validate(self)

  # ---- derived sizes -------------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_k_dense

  @property
  def yarn(self) -> bool:
    return self.rope_factor > 1.0

  @property
  def kv_cache_values_per_token(self) -> int:
    """What MLA caches per token per layer: the latent c_KV and the shared rope key."""
    return self.kv_lora_rank + self.qk_rope_head_dim

  # ---- construction --------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds from a plain mapping (e.g. `config.model.to_dict()`); unknown keys are an error."""
    return cls(**known_fields(cls, values))

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def known_fields(cls, values: Mapping[str, Any]) -> dict[str, Any]:
  """`values` as a dict, after a ValueError naming any key that is not a field of dataclass
  `cls` (the run configs' `from_dict` share it)."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f'{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(names)}')
  return dict(values)


def _fail(field: str, value: Any, why: str):
  raise ValueError(f'ModelConfig.{field}={value!r}: {why}')


def _validate(c: ModelConfig) -> None:
  for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'qk_nope_head_dim',
               'qk_rope_head_dim', 'v_head_dim', 'kv_lora_rank', 'intermediate_size',
               'moe_intermediate_size', 'num_experts_per_tok', 'n_group', 'topk_group',
               'rope_original_max_position', 'max_position_embeddings'):
    value = getattr(c, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      _fail(name, value, 'must be a positive integer')
  for name in ('first_k_dense', 'n_shared_experts', 'n_routed_experts', 'mtp_depth'):
    value = getattr(c, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      _fail(name, value, 'must be a non-negative integer')
  if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank <= 0):
    _fail('q_lora_rank', c.q_lora_rank, 'must be a positive integer or None (plain query)')
  for name in ('routed_scaling_factor', 'rms_norm_eps', 'rope_theta', 'rope_beta_fast',
               'rope_beta_slow', 'init_std'):
    value = getattr(c, name)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      _fail(name, value, 'must be a positive finite number')
  if c.rope_factor < 1.0:
    _fail('rope_factor', c.rope_factor, 'must be >= 1 (1 turns YaRN off)')
  if c.rope_beta_fast <= c.rope_beta_slow:
    _fail('rope_beta_fast', c.rope_beta_fast,
          f'must exceed rope_beta_slow={c.rope_beta_slow} (YaRN ramp)')
  if c.qk_rope_head_dim % 2:
    _fail('qk_rope_head_dim', c.qk_rope_head_dim, 'must be even (RoPE rotates pairs)')
  if c.first_k_dense > c.num_layers:
    _fail('first_k_dense', c.first_k_dense, f'exceeds num_layers={c.num_layers}')
  if c.scoring_func not in SCORING_FUNCS:
    _fail('scoring_func', c.scoring_func, f'must be one of {SCORING_FUNCS}')
  if c.dtype not in DTYPES:
    _fail('dtype', c.dtype, f'must be one of {DTYPES}')
  if c.moe_matmul not in MOE_MATMULS:
    _fail('moe_matmul', c.moe_matmul, f'must be one of {MOE_MATMULS}')
  if c.precision not in PRECISIONS:
    _fail('precision', c.precision, f'must be one of {PRECISIONS}')
  if c.remat not in REMAT_POLICIES:
    _fail('remat', c.remat, f'must be one of {REMAT_POLICIES}')
  if c.attention not in ATTENTIONS:
    _fail('attention', c.attention, f'must be one of {ATTENTIONS}')
  for name in ('mla_decode_kernel', 'fp8_matmul_kernel'):
    if getattr(c, name) not in KERNELS:
      _fail(name, getattr(c, name), f'must be one of {KERNELS}')
  if c.fp8_weights not in (True, False):
    _fail('fp8_weights', c.fp8_weights, 'must be True or False')
  if c.fp8_weights and c.precision != 'fp8':
    _fail('fp8_weights', c.fp8_weights, f"needs precision='fp8' (got {c.precision!r}): the "
          'weights kept in E4M3 are multiplied by the FP8 GEMMs')
  if c.precision == 'fp8' and c.moe_matmul == 'ragged_dot':
    _fail('moe_matmul', c.moe_matmul,
          "has no FP8 form; with precision='fp8' use 'blocked' or 'auto'")
  if c.num_moe_layers == 0 and c.mtp_depth == 0:
    return  # an all-dense model: the routing fields are unused (MTP blocks are MoE layers)
  if c.n_routed_experts == 0:
    _fail('n_routed_experts', 0, f'must be positive when MoE layers exist (num_layers='
          f'{c.num_layers}, first_k_dense={c.first_k_dense}, mtp_depth={c.mtp_depth}; '
          'every MTP block is an MoE layer)')
  if c.num_experts_per_tok > c.n_routed_experts:
    _fail('num_experts_per_tok', c.num_experts_per_tok,
          f'exceeds n_routed_experts={c.n_routed_experts}')
  if c.n_routed_experts % c.n_group:
    _fail('n_routed_experts', c.n_routed_experts, f'is not divisible by n_group={c.n_group}')
  if c.topk_group > c.n_group:
    _fail('topk_group', c.topk_group, f'exceeds n_group={c.n_group}')
  per_group = c.n_routed_experts // c.n_group
  if c.num_experts_per_tok > c.topk_group * per_group:
    _fail('num_experts_per_tok', c.num_experts_per_tok,
          f'exceeds the experts left after group limiting: topk_group={c.topk_group} x '
          f'{per_group} experts per group')
  if c.use_router_bias and c.n_group > 1 and per_group < 2:
    _fail('n_group', c.n_group, f'leaves {per_group} expert per group; the group score sums '
          'the top-2 biased scores of a group, so each group needs at least 2 experts')

"""The frozen, validated run configuration: `TrainConfig` (the `train.*` section) and `MeshConfig`
(the `mesh.*` section), beside the model's `ModelConfig` (deepseek_jax/config.py).

The experiment configs (`experiments/configs/*.py`) stay ml-collections ConfigDicts, overridable on
the command line; `resolve(config)` turns a run's ConfigDict into these typed objects exactly once
(`loop.train` calls it), and every invalid value fails there with a `ValueError` that names the
field and its value. Two rules are applied there, and each change is reported as one line:
- Fit to the step count: a `warmup_steps` that does not fit inside `steps` becomes 10% of them
  (the base config's share, 100 of 1,000; tiny.py has 40 of 450), a `log_every` above `steps`
  becomes `steps` (the last step is logged). Fields set explicitly on the command line (`explicit`)
  are never changed: an explicit warm-up that does not fit is an error naming it. A γ or λ
  switch step at or past `steps` is kept (the early value throughout, as it always meant) and
  reported; moving it would change runs that work today.
- `bf16_moments=None` (the default) resolves to True under `model.precision='fp8'` (V3 §3.3 keeps
  AdamW's moments in BF16 in its FP8 recipe) and to False otherwise; True or False is kept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Mapping

from deepseek_jax.config import ModelConfig, known_fields


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The `train.*` fields: run length, batch, logging, AdamW, the schedules, the loss weights."""

  steps: int = 1000
  batch_size: int = 16                 # sequences per step, over all processes
  seq_len: int = 256
  log_every: int = 10                  # metrics.jsonl row every this many steps
  eval_every: int = 100                # held-out eval; also at the last step
  checkpoint_every: int = 200          # also at the last step and on SIGTERM
  eval_batches: int = 8                # held-out batches per evaluation
  keep_checkpoints: int = 3
  sample_prompt: str = 'The '          # the text sample written at the end of the run
  sample_tokens: int = 200             # 0: no sample
  learning_rate: float = 3e-3          # peak, after the warm-up
  warmup_steps: int = 100              # linear from 0; must be < steps (fitted, module docstring)
  min_lr_ratio: float = 0.1            # cosine decays to learning_rate * min_lr_ratio at `steps`
  weight_decay: float = 0.1            # V3 §4.2; matrices only
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0               # global norm over the parameters' gradients; 0: off
  # AdamW mu and nu in bfloat16 (V3 §3.3). None: BF16 under model.precision='fp8' (V3's FP8
  # recipe), FP32 otherwise; resolved (and printed) by `resolve`.
  bf16_moments: bool | None = None
  bias_gamma: float = 1e-3             # aux-loss-free bias update speed (V3 §2.1.2)
  bias_gamma_late: float = 0.0         # gamma from bias_gamma_switch_step on (V3 §4.2 ends with 0)
  bias_gamma_switch_step: int = -1     # -1: bias_gamma throughout
  bal_alpha: float = 1e-4              # sequence-wise balance loss weight (eq. 17)
  mtp_weight: float = 0.3              # lambda of eq. 25
  mtp_weight_late: float = 0.1
  mtp_weight_switch_step: int = -1     # step from which mtp_weight_late applies; -1: constant
  # Positions per chunk of the output head + cross-entropy in the train step (train/loss.py); 0:
  # all at once. A chunk's [B, chunk, V] logits are computed again in the backward pass, so the
  # [B, T, V] ones are never held: DeepSeek-V3 at 8 x 4,096 tokens per device has 16.9 GB of
  # float32 logits per head (main and each MTP depth), and as much again for their gradient.
  loss_chunk: int = 0

  def __post_init__(self):
    _validate_train(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'TrainConfig':
    """Builds from a plain mapping (e.g. `config.train.to_dict()`); unknown keys are an error."""
    return cls(**known_fields(cls, values))

  def replace(self, **changes) -> 'TrainConfig':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The ('data', 'expert', 'plane') device mesh (deepseek_jax/sharding.py). One size may be -1:
  all devices left over. The batch is split over all three axes, routed experts over
  expert x plane; `fsdp` also splits every weight's model dimension over data. The default puts
  every device on data (1 x 1 x 1 on one device)."""

  data: int = -1
  expert: int = 1
  plane: int = 1
  fsdp: bool = False

  def __post_init__(self):
    sizes = {'data': self.data, 'expert': self.expert, 'plane': self.plane}
    for name, size in sizes.items():
      if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
        _fail('MeshConfig', name, size, 'must be a positive integer or -1 (the devices left over)')
    if list(sizes.values()).count(-1) > 1:
      _fail('MeshConfig', 'data', self.data,
            f'at most one size may be -1 (data={self.data}, expert={self.expert}, '
            f'plane={self.plane})')
    if not isinstance(self.fsdp, bool):
      _fail('MeshConfig', 'fsdp', self.fsdp, 'must be True or False')

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'MeshConfig':
    return cls(**known_fields(cls, values))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A run's typed sections, and one line per field `resolve` changed or resolved."""

  model: ModelConfig
  train: TrainConfig
  mesh: MeshConfig
  notes: tuple[str, ...] = ()


def fit_train(values: Mapping[str, Any], precision: str,
              explicit: Collection[str] = ()) -> tuple[TrainConfig, tuple[str, ...]]:
  """`TrainConfig` from `values` after the rules of the module docstring; `explicit` names the
  train fields set on the command line (never changed). Returns it and one line per rule applied."""
  values = {**TrainConfig().to_dict(), **values}
  notes = []

  def change(name: str, new: Any, why: str):
    notes.append(f'train.{name}: {values[name]!r} -> {new!r} ({why})')
    values[name] = new

  steps = values['steps']
  if _is_int(steps) and steps > 0:  # otherwise TrainConfig names it below
    warmup = values['warmup_steps']
    if _is_int(warmup) and warmup >= steps and 'warmup_steps' not in explicit:
      change('warmup_steps', steps // 10, f'must be below steps={steps}: 10% of the run')
    log_every = values['log_every']
    if _is_int(log_every) and log_every > steps and 'log_every' not in explicit:
      change('log_every', steps, f'above steps={steps}: the last step is logged')
    for switch, early in (('bias_gamma_switch_step', 'bias_gamma'),
                          ('mtp_weight_switch_step', 'mtp_weight')):
      if _is_int(values[switch]) and values[switch] >= steps:
        notes.append(f'train.{switch}={values[switch]} is not reached in steps={steps}: '
                     f'{early}={values[early]} throughout')
  if values['bf16_moments'] is None:
    fp8 = precision == 'fp8'
    change('bf16_moments', fp8, f'model.precision={precision!r}: AdamW moments in '
           + ("BF16, V3 §3.3's FP8 recipe" if fp8 else "FP32 (BF16 is the default under 'fp8')"))
  return TrainConfig.from_dict(values), tuple(notes)


def resolve(config, explicit: Collection[str] = ()) -> RunConfig:
  """The typed `model`, `train` and `mesh` sections of a run's ConfigDict (`mesh` at its defaults
  when absent). `explicit`: `train.*` field names given on the command line."""
  model = ModelConfig.from_dict(config.model.to_dict())
  train, notes = fit_train(config.train.to_dict(), model.precision, explicit)
  mesh = MeshConfig.from_dict(config.mesh.to_dict() if config.get('mesh') else {})
  return RunConfig(model, train, mesh, notes)


# ---- validation --------------------------------------------------------------------------------

def _fail(kind: str, field: str, value: Any, why: str):
  raise ValueError(f'{kind}.{field}={value!r}: {why}')


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _validate_train(c: TrainConfig) -> None:
  def fail(field, why):
    _fail('TrainConfig', field, getattr(c, field), why)

  for name in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'checkpoint_every',
               'eval_batches', 'keep_checkpoints'):
    if not _is_int(getattr(c, name)) or getattr(c, name) <= 0:
      fail(name, 'must be a positive integer')
  if not _is_int(c.loss_chunk) or c.loss_chunk < 0:
    fail('loss_chunk', 'must be a non-negative integer (0: the whole sequence at once)')
  if not _is_int(c.sample_tokens) or c.sample_tokens < 0:
    fail('sample_tokens', 'must be a non-negative integer')
  if not isinstance(c.sample_prompt, str):
    fail('sample_prompt', 'must be a string')
  for name in ('learning_rate', 'eps'):
    if not _is_number(getattr(c, name)) or getattr(c, name) <= 0:
      fail(name, 'must be a positive finite number')
  for name in ('weight_decay', 'grad_clip', 'bias_gamma', 'bias_gamma_late', 'bal_alpha',
               'mtp_weight', 'mtp_weight_late'):
    if not _is_number(getattr(c, name)) or getattr(c, name) < 0:
      fail(name, 'must be a non-negative finite number')
  if not _is_number(c.min_lr_ratio) or not 0 <= c.min_lr_ratio <= 1:
    fail('min_lr_ratio', 'must lie in [0, 1]')
  for name in ('b1', 'b2'):
    if not _is_number(getattr(c, name)) or not 0 <= getattr(c, name) < 1:
      fail(name, 'must lie in [0, 1)')
  if c.bf16_moments is not None and not isinstance(c.bf16_moments, bool):
    fail('bf16_moments', 'must be True, False or None (BF16 under precision=fp8)')
  for name in ('bias_gamma_switch_step', 'mtp_weight_switch_step'):
    if not _is_int(getattr(c, name)) or getattr(c, name) < -1:
      fail(name, 'must be a step >= 0, or -1 (no switch)')
  if not _is_int(c.warmup_steps) or not 0 <= c.warmup_steps < c.steps:
    fail('warmup_steps', f'must lie in [0, steps={c.steps}) (the cosine decay needs a step '
         'after the warm-up)')

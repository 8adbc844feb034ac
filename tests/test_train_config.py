"""TrainConfig and MeshConfig: unknown fields and impossible values fail naming the field and the
value; `resolve` fits the schedule to the step count (never a command-line value), resolves the
FP8 moment rule, and leaves every experiment config at its own step count exactly as written."""

import importlib
import pathlib

import pytest

from deepseek_jax.train.config import MeshConfig, TrainConfig, fit_train, resolve
from experiments.configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'experiments' / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'common'))


def assert_fails(kind, changes: dict, field: str, *extra: str):
  with pytest.raises(ValueError) as info:
    kind(**changes)
  message = str(info.value)
  assert f'{kind.__name__}.{field}={changes[field]!r}' in message, message
  for text in extra:
    assert text in message, message


@pytest.mark.parametrize('kind', [TrainConfig, MeshConfig])
def test_unknown_field_is_named(kind):
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['warmup_step'\]"):
    kind.from_dict({'warmup_step': 1})


@pytest.mark.parametrize('field,value,why', [
    ('steps', 0, 'positive integer'), ('batch_size', -4, 'positive integer'),
    ('seq_len', 12.0, 'positive integer'), ('log_every', True, 'positive integer'),
    ('keep_checkpoints', 0, 'positive integer'), ('sample_tokens', -1, 'non-negative'),
    ('learning_rate', float('nan'), 'positive finite'), ('eps', 0.0, 'positive finite'),
    ('weight_decay', -0.1, 'non-negative'), ('bias_gamma', float('inf'), 'non-negative'),
    ('min_lr_ratio', 1.5, '[0, 1]'), ('b2', 1.0, '[0, 1)'),
    ('bf16_moments', 'yes', 'True, False or None'),
    ('bias_gamma_switch_step', -2, '-1 (no switch)'), ('mtp_weight_switch_step', 3.0, '-1'),
    ('warmup_steps', 1000, 'steps=1000'), ('warmup_steps', -1, '[0, steps=1000)'),
    ('loss_chunk', -1, 'non-negative integer'), ('loss_chunk', 512.0, 'non-negative integer'),
])
def test_bad_train_value_names_field_and_value(field, value, why):
  assert_fails(TrainConfig, {field: value}, field, why)


@pytest.mark.parametrize('changes,field,why', [
    (dict(data=0), 'data', 'positive integer or -1'),
    (dict(expert=2.0), 'expert', 'positive integer or -1'),
    (dict(data=-1, plane=-1), 'data', 'at most one'),
    (dict(fsdp='yes'), 'fsdp', 'True or False'),
])
def test_bad_mesh_value_names_field_and_value(changes, field, why):
  assert_fails(MeshConfig, changes, field, why)


def test_defaults_are_the_run_configs_and_round_trip():
  config = tiny.get_config()
  assert set(config.train) == set(TrainConfig().to_dict())  # each overridable on the command line
  assert config.train.bf16_moments is None
  assert MeshConfig.from_dict(config.mesh.to_dict()) == MeshConfig()
  train = TrainConfig(steps=7, warmup_steps=3)
  assert TrainConfig.from_dict(train.to_dict()) == train


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_resolves_at_its_own_step_count_as_written(name):
  """Nothing is fitted at the configs' own lengths: their README figures hold."""
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  run = resolve(config)
  written = config.train.to_dict()
  fp8 = run.model.precision == 'fp8'
  assert run.train.to_dict() == {**written, 'bf16_moments': fp8}
  assert run.mesh == MeshConfig.from_dict(config.mesh.to_dict())
  assert [note.split(':')[0] for note in run.notes] == ['train.bf16_moments']


def test_tiny_at_its_450_steps():
  train = resolve(tiny.get_config()).train
  assert (train.steps, train.warmup_steps, train.bias_gamma_switch_step, train.log_every,
          train.bf16_moments) == (450, 40, 360, 10, False)


def test_one_steps_override_fits_the_warmup_and_reports_each_change():
  values = dict(tiny.get_config().train.to_dict(), steps=10)
  train, notes = fit_train(values, 'bf16', explicit={'steps'})
  assert (train.warmup_steps, train.log_every, train.bias_gamma_switch_step) == (1, 10, 360)
  assert notes == (
      'train.warmup_steps: 40 -> 1 (must be below steps=10: 10% of the run)',
      'train.bias_gamma_switch_step=360 is not reached in steps=10: bias_gamma=0.01 throughout',
      "train.bf16_moments: None -> False (model.precision='bf16': AdamW moments in FP32 (BF16 "
      "is the default under 'fp8'))")
  five, notes = fit_train(dict(values, steps=5), 'bf16')
  assert (five.warmup_steps, five.log_every) == (0, 5)
  assert notes[1] == 'train.log_every: 10 -> 5 (above steps=5: the last step is logged)'


def test_a_value_given_on_the_command_line_is_never_changed():
  values = dict(tiny.get_config().train.to_dict(), steps=10)
  with pytest.raises(ValueError, match=r'TrainConfig\.warmup_steps=40: must lie in \[0, steps=10'):
    fit_train(values, 'bf16', explicit={'steps', 'warmup_steps'})
  kept, _ = fit_train(dict(values, steps=5), 'bf16', explicit={'log_every'})
  assert kept.log_every == 10  # valid: no training row is logged, the last eval is


def test_fp8_moments_rule():
  assert fit_train({}, 'fp8')[0].bf16_moments is True
  assert fit_train({}, 'bf16')[0].bf16_moments is False
  kept, notes = fit_train({'bf16_moments': False}, 'fp8')  # an explicit choice is kept
  assert kept.bf16_moments is False and notes == ()

"""Every config file under experiments/configs loads, validates and builds a model abstractly;
the summary command prints the figures computed from it."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from deepseek_jax.analysis import params
from deepseek_jax.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'experiments' / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'common'))


def test_the_three_reference_configs_exist():
  assert {'tiny', 'deepseek_v3', 'deepseek_v2_lite'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_file_loads_and_validates(name):
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  cfg = ModelConfig.from_dict(config.model.to_dict())
  for field in ('seed', 'train.steps', 'train.batch_size', 'train.seq_len', 'train.log_every',
                'train.eval_every', 'train.checkpoint_every', 'train.learning_rate', 'data.path'):
    node = config
    for part in field.split('.'):
      node = node[part]
  counts = params.count(cfg)
  assert 0 < counts.activated < counts.total


@pytest.mark.parametrize('name', CONFIGS)
def test_every_model_field_can_be_overridden(name):
  """`--config.model.<field>` needs the field in the ConfigDict, defaults included."""
  model = importlib.import_module(f'experiments.configs.{name}').get_config().model
  assert set(model) == set(ModelConfig.__dataclass_fields__)


def test_a_model_field_that_does_not_exist_is_named():
  from experiments.configs import common  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match='hidden_sise'):
    common.base_config({'hidden_sise': 64})


@pytest.mark.parametrize('name', ['tiny_no_balancing', 'tiny_aux_loss_only'])
def test_ablations_without_the_bias_never_move_it(name):
  """gamma is 0 at every step, including after tiny.py's late switch."""
  from deepseek_jax.train import optimizer  # pylint: disable=import-outside-toplevel
  from deepseek_jax.train.config import resolve  # pylint: disable=import-outside-toplevel
  train = resolve(importlib.import_module(f'experiments.configs.{name}').get_config()).train
  gamma = optimizer.bias_gamma_schedule(train)
  assert [float(gamma(step)) for step in (0, train.steps // 2, train.steps - 1)] == [0.0] * 3


def test_summary_command_prints_counts_and_rejects_bad_override():
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.summary', '--config=experiments/configs/tiny.py',
       '--config.model.n_routed_experts=8'], cwd=ROOT, capture_output=True, text=True, check=True)
  cfg = ModelConfig.from_dict(
      {**importlib.import_module('experiments.configs.tiny').get_config().model.to_dict(),
       'n_routed_experts': 8})
  assert f'{params.count(cfg).total:,}' in done.stdout
  assert 'layers.1.ffn.w_gate' in done.stdout and '(8, 128, 64)' in done.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'experiments.summary', '--config=experiments/configs/tiny.py',
       '--config.model.topk_group=9'], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0
  assert 'topk_group=9' in bad.stderr and 'n_group=4' in bad.stderr

"""Prints a model's parameter counts (from jax.eval_shape, no memory used) and its parameter tree.

  python -m experiments.summary --config=experiments/configs/deepseek_v3.py [--noshapes]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax.analysis import params
from deepseek_jax.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/tiny.py',
                                          'Experiment config file.')
_SHAPES = flags.DEFINE_bool('shapes', True, 'Also print every variable with shape and axes.')


def main(argv):
  del argv
  try:
    cfg = ModelConfig.from_dict(_CONFIG.value.model.to_dict())
  except ValueError as e:
    sys.exit(f'error in --config model fields: {e}')
  print(params.summary(cfg, with_shapes=_SHAPES.value))


if __name__ == '__main__':
  app.run(main)

"""Trains one config twice, BF16 and FP8 (V3 §3.3), and prints one JSON line comparing the final
train and held-out losses (`rel_diff_eval_loss`); writes <workdir>/fp8_vs_bf16.png.

  python -m experiments.fp8_vs_bf16 [--config=experiments/configs/tiny.py]
      [--config.train.steps=1000] [--workdir=runs/fp8_vs_bf16]

Rerunning resumes both runs from their checkpoints.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import hostmem
from deepseek_jax.train import precision_compare

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/tiny.py',
                                          'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/fp8_vs_bf16', 'Holds bf16/ and fp8/ runs.')
_STEPS = flags.DEFINE_integer('steps', 1000, 'Training steps of each run.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config.train.steps = _STEPS.value
  try:
    result = precision_compare.compare(config, _WORKDIR.value)
  except (ValueError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(result))


if __name__ == '__main__':
  hostmem.reexec_with_huge_pages('experiments.fp8_vs_bf16')  # see deepseek_jax/hostmem.py
  app.run(main)

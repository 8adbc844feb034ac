"""Trains one config twice per seed, BF16 and FP8 (V3 §3.3), and prints one JSON line comparing
the final train and held-out losses, averaged over the seeds (`rel_diff_eval_loss`, with its
standard error and the per-seed figures); writes <workdir>/fp8_vs_bf16.png.

  python -m experiments.fp8_vs_bf16 [--config=experiments/configs/tiny_one_pass.py]
      [--steps=1000] [--seeds=0,1,2,3,4] [--workdir=runs/fp8_vs_bf16]

The default config is the tiny model on unrepeated data (`tiny_one_pass.py` says why).

Each run lives in <workdir>/seed<seed>/<precision>; rerunning resumes them from their
checkpoints and reuses the finished ones.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import hostmem
from experiments import precision_compare

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/tiny_one_pass.py',
                                          'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/fp8_vs_bf16', 'Holds seed<k>/{bf16,fp8}/ runs.')
_STEPS = flags.DEFINE_integer('steps', None, 'Training steps of each run (default: the config\'s).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'],
                           'Seeds (init and data order); the losses are averaged over them.')
flags.register_validator('seeds', lambda seeds: all(s.strip().isdigit() for s in seeds),
                         message='--seeds takes non-negative integers separated by commas')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _STEPS.value is not None:
    config.train.steps = _STEPS.value
  try:
    result = precision_compare.compare(config, _WORKDIR.value, [int(s) for s in _SEEDS.value])
  except (ValueError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(result))


if __name__ == '__main__':
  hostmem.reexec_with_huge_pages('experiments.fp8_vs_bf16')  # see deepseek_jax/hostmem.py
  app.run(main)

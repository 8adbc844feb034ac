"""The main job: trains a config (default: the tiny model on the text that ships with Python).

  python -m experiments.run [--config=experiments/configs/tiny.py] [--config.train.steps=100]
                            [--workdir=runs/tiny]

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import hostmem

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/tiny.py',
                                          'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default runs/<config name>).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and XLA log every save at INFO
  name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS['config'])).stem
  workdir = _WORKDIR.value or f'runs/{name}'
  from deepseek_jax.train import loop  # pylint: disable=import-outside-toplevel  (after hostmem)
  try:
    result = loop.train(_CONFIG.value, workdir)
  except (ValueError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps({k: v for k, v in result.items() if k != 'sample'}))


if __name__ == '__main__':
  hostmem.reexec_with_huge_pages('experiments.run')  # before anything imports JAX
  app.run(main)

"""The main job: trains a config (default: the tiny model on the text that ships with Python).

  python -m experiments.run [--config=experiments/configs/tiny.py] [--config.train.steps=100]
                            [--workdir=runs/tiny] [--config.mesh.expert=2 --config.mesh.plane=4]

Rerunning the same command resumes from the workdir's latest checkpoint. A shorter run needs one
override: `--config.train.steps=10` fits the config's warm-up to it and prints each field it
changed (`deepseek_jax/train/config.py`); a `--config.train.*` value given here is never changed,
so one that does not fit is an error naming it.

Fine-tuning starts a new workdir from pretrained weights, which also fix the model config
(`deepseek_jax/train/pretrained.py`; experiments/convert.py writes the same start ahead):

  python -m experiments.run --config=experiments/configs/finetune.py --workdir=runs/ft \
      --config.init_from=hf:path/to/save_pretrained_dir --config.data.path='my_texts/*.txt'

Several processes (hosts, or CPU processes on one machine) run the same command, each with its
own process id, and share the workdir (checkpoints are written by all, logs by process 0):

  python -m experiments.run --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=0 ...   # and --process_id=1 on the other

Without these flags `jax.distributed.initialize` still runs when JAX_COORDINATOR_ADDRESS is set
(JAX reads it, with JAX_COORDINATOR_PORT, JAX_COORDINATOR_BIND_ADDRESS and
JAX_LOCAL_DEVICE_IDS), or with --distributed; what is not given JAX detects on Slurm
(SLURM_* variables), Open MPI (OMPI_* variables), Cloud TPU pods and Kubernetes (JobSet).
"""

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import hostmem
from experiments import distributed

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/tiny.py',
                                          'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default runs/<config name>).')
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and XLA log every save at INFO
  distributed.initialize()
  name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS['config'])).stem
  workdir = _WORKDIR.value or f'runs/{name}'
  import jax  # pylint: disable=import-outside-toplevel
  from deepseek_jax.train import loop  # pylint: disable=import-outside-toplevel  (after hostmem)
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  explicit = {name.split('.', 1)[1] for name in overrides if name.startswith('train.')}
  explicit_model = {name.split('.', 1)[1] for name in overrides if name.startswith('model.')}
  try:
    result = loop.train(_CONFIG.value, workdir, explicit, explicit_model)
  except (ValueError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in result.items() if k != 'sample'}))


if __name__ == '__main__':
  hostmem.reexec_with_huge_pages('experiments.run')  # before anything imports JAX
  app.run(main)

"""Converts a Hugging Face DeepSeek checkpoint into a training workdir, ready to fine-tune.

  python -m experiments.convert --hf=path/to/save_pretrained_dir --workdir=runs/ft \
      [--config=experiments/configs/finetune.py] [--config.train.bf16_moments=true ...]
  python -m experiments.run --config=experiments/configs/finetune.py --workdir=runs/ft \
      --config.data.path='my_texts/*.txt'

Writes `<workdir>/checkpoints/0` as `experiments.run` would save a step-0 state: the weights
(FP8 ones dequantized to float32 masters), a fresh optimizer state, and a meta holding the model
config from config.json and the source; plus `<workdir>/tokenizer.json`, the directory's own
(not under `--config.data.tokenizer=byte`, which would not read it).
Give the `--config` (and `--config.train.*` overrides) the workdir will train with: the optimizer
state's shape follows it (e.g. `bf16_moments`, `grad_clip`). The run then takes its model config
from the checkpoint (deepseek_jax/train/pretrained.py), so the config file's `model` section
does not have to match. The weights are read onto the config's mesh (`config.mesh`), so several
processes (`experiments/distributed.py`'s flags, as `experiments.run` takes them) each read
only their own blocks and write their own part of the checkpoint; process 0 prints.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import distributed

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/finetune.py',
                                          'The config the workdir will train with.')
_HF = flags.DEFINE_string('hf', None, 'Hugging Face save_pretrained directory (config.json, '
                          '*.safetensors, tokenizer.json).', required=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The new training workdir.', required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize()
  import jax  # pylint: disable=import-outside-toplevel  (after jax.distributed)
  from deepseek_jax.train import loop  # pylint: disable=import-outside-toplevel
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  explicit_model = {name.split('.', 1)[1] for name in overrides if name.startswith('model.')}
  try:
    where = loop.convert(_CONFIG.value, _HF.value, _WORKDIR.value, explicit_model)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() == 0:
    print(f'wrote {where}')


if __name__ == '__main__':
  app.run(main)

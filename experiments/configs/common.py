"""Pieces shared by the experiment configs: the run fields every script relies on."""

import ml_collections
from ml_collections import config_dict

from deepseek_jax.config import ModelConfig
from deepseek_jax.train.config import MeshConfig, TrainConfig


def base_config(model: dict) -> ml_collections.ConfigDict:
  """A run config: `seed`, `init_from`, `model.<ModelConfig field>`, `train.<TrainConfig field>`,
  `data.*`, `mesh.<MeshConfig field>`.

  `model`, `train` and `mesh` hold every field of their dataclass (at its default where not
  given), so each one can be overridden on the command line, e.g. `--config.model.precision=fp8`
  or `--config.train.steps=10`; `ModelConfig` rejects unknown fields and impossible values here
  already, and `train.config.resolve` turns the sections into the typed objects for the run.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Pretrained weights a workdir without checkpoints starts from (fresh optimizer, step 0):
  # 'hf:<save_pretrained dir>' or a training workdir; their model config replaces `model`
  # (deepseek_jax/train/pretrained.py). '' trains from a random initialisation.
  config.init_from = ''
  config.model = ml_collections.ConfigDict(ModelConfig.from_dict(model).to_dict())
  train = TrainConfig().to_dict()
  # None until the run resolves it from model.precision, but overridable with True/False
  train['bf16_moments'] = config_dict.placeholder(bool)
  config.train = ml_collections.ConfigDict(train)
  config.data = ml_collections.ConfigDict(dict(
      path='',                     # '' = the corpus shipped with Python; or files, a dir, a glob
      # 'byte', 'bpe' (trained on the train split, saved in the workdir) or 'checkpoint' (the
      # tokenizer.json of pretrained weights, copied into the workdir; see `init_from`)
      tokenizer='byte',
      heldout_fraction=0.05,
  ))
  # The device mesh (deepseek_jax/sharding.py; deepseek_jax/DESIGN.md, "Sharding and the
  # multi-plane mesh"; fields in MeshConfig), e.g. --config.mesh.expert=2 --config.mesh.plane=4
  # on 8 devices.
  config.mesh = ml_collections.ConfigDict(MeshConfig().to_dict())
  return config

"""Pieces shared by the experiment configs: the run fields every script relies on."""

import ml_collections

from deepseek_jax.config import ModelConfig
from deepseek_jax.train import optimizer


def base_config(model: dict) -> ml_collections.ConfigDict:
  """A run config: `seed`, `model.<ModelConfig field>`, `train.*`, `data.*`, `mesh.*`.

  `model` holds every ModelConfig field (those `model` leaves out at their defaults), so each one
  can be overridden on the command line, e.g. `--config.model.precision=fp8`; `ModelConfig`
  rejects unknown fields and impossible values here already.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(ModelConfig.from_dict(model).to_dict())
  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=16,
      seq_len=256,
      log_every=10,
      eval_every=100,
      checkpoint_every=200,
      learning_rate=3e-3,
      eval_batches=8,              # held-out batches per evaluation
      keep_checkpoints=3,
      sample_prompt='The ',
      sample_tokens=200,
      **optimizer.default_train_fields(),
  ))
  config.data = ml_collections.ConfigDict(dict(
      path='',                     # '' = the corpus shipped with Python; or files, a dir, a glob
      tokenizer='byte',            # 'byte' or 'bpe' (trained on the train split, saved in workdir)
      heldout_fraction=0.05,
  ))
  # The device mesh (deepseek_jax/sharding.py, DESIGN.md "Sharding and the multi-plane mesh"):
  # data x expert x plane devices, one size may be -1 (all devices left over). The batch is split
  # over all three, routed experts over expert x plane; fsdp also splits every weight's model
  # dimension over data. The default puts every device on data (1x1x1 on one device).
  # E.g. --config.mesh.expert=2 --config.mesh.plane=4 on 8 devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1, plane=1, fsdp=False))
  return config

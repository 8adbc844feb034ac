"""Pieces shared by the experiment configs: the run fields every script relies on."""

import ml_collections


def base_config(model: dict) -> ml_collections.ConfigDict:
  """A run config: `seed`, `model.<ModelConfig field>`, `train.*`, `data.*`."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(model)
  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=16,
      seq_len=256,
      log_every=10,
      eval_every=100,
      checkpoint_every=200,
      learning_rate=3e-3,
  ))
  config.data = ml_collections.ConfigDict(dict(path=''))  # '' = the corpus shipped with Python
  return config

"""Ablation: balancing by the sequence-wise auxiliary loss alone (alpha = 0.01, no bias update)."""

from experiments.configs import tiny


def get_config():
  config = tiny.get_config()
  config.train.bias_gamma = 0.0
  config.train.bal_alpha = 0.01
  return config

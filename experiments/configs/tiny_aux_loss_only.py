"""Ablation: balancing by the sequence-wise auxiliary loss alone (alpha = 0.01, no bias update)."""

from experiments.configs import tiny


def get_config():
  config = tiny.get_config()
  config.train.bias_gamma = 0.0
  config.train.bias_gamma_late = 0.0  # tiny.py lowers gamma late; here it stays 0 throughout
  config.train.bal_alpha = 0.01
  return config

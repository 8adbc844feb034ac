"""Ablation: no Multi-Token Prediction module (mtp_depth = 0)."""

from experiments.configs import tiny


def get_config():
  config = tiny.get_config()
  config.model.mtp_depth = 0
  return config

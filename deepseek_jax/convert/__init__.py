"""Checkpoint conversion: Hugging Face DeepSeek-V3 (safetensors, BF16 or FP8) <-> our model."""

from deepseek_jax.convert.export import save_pretrained
from deepseek_jax.convert.hf import config_from_hf, config_to_hf, load_pretrained

__all__ = ['config_from_hf', 'config_to_hf', 'load_pretrained', 'save_pretrained']

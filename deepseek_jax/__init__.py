"""deepseek-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax NNX."""

from deepseek_jax.config import ModelConfig

__all__ = ['ModelConfig']
__version__ = '0.1.0'

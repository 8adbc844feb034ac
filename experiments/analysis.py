"""Prints the DeepSeek papers' tables recomputed from this codebase's configs, next to the published
figures: parameters, KV cache, training FLOPs, network cost, EP decode limit, node-limited routing.

  python -m experiments.analysis [--format=markdown|json]

Parameter counts use jax.eval_shape of the 671B and 236B models (about 30 s on a CPU, no memory).
"""

from absl import app, flags

from deepseek_jax.analysis import tables
from deepseek_jax.config import ModelConfig
from experiments.configs import deepseek_v2, deepseek_v2_lite, deepseek_v3

_FORMAT = flags.DEFINE_enum('format', 'markdown', ['markdown', 'json'], 'Output format.')


def _model(config_module) -> ModelConfig:
  return ModelConfig.from_dict(config_module.get_config().model.to_dict())


def main(argv):
  del argv
  print(tables.render(tables.build(_model(deepseek_v3), _model(deepseek_v2),
                                   _model(deepseek_v2_lite)), _FORMAT.value))


if __name__ == '__main__':
  app.run(main)

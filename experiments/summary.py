"""Prints a model's parameter counts (from jax.eval_shape, no memory used) and its parameter tree,
and with --mesh the train state's memory per device on that (data, expert, plane) mesh.

  python -m experiments.summary --config=experiments/configs/deepseek_v3.py [--noshapes]
      [--mesh=32,8,8]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax.analysis import memory, params
from deepseek_jax.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/tiny.py',
                                          'Experiment config file.')
_SHAPES = flags.DEFINE_bool('shapes', True, 'Also print every variable with shape and axes.')
_MESH = flags.DEFINE_list('mesh', None, 'data,expert,plane: also print the train state\'s bytes '
                          'per device on this mesh (abstract: no devices needed), with and '
                          'without FSDP, AdamW moments in BF16.')


def main(argv):
  del argv
  try:
    cfg = ModelConfig.from_dict(_CONFIG.value.model.to_dict())
  except ValueError as e:
    sys.exit(f'error in --config model fields: {e}')
  print(params.summary(cfg, with_shapes=_SHAPES.value))
  if _MESH.value:
    try:
      mesh = tuple(int(v) for v in _MESH.value)
      if len(mesh) != 3:
        raise ValueError
    except ValueError:
      sys.exit(f'error: --mesh={",".join(_MESH.value)}: give three integers data,expert,plane')
    print(f'\ntrain state per device on mesh data x expert x plane = {mesh} '
          f'({mesh[0] * mesh[1] * mesh[2]} devices), FP32 weights, BF16 AdamW moments:')
    for fsdp in (False, True):
      try:
        m = memory.per_device(cfg, mesh, fsdp)
      except ValueError as e:
        sys.exit(f'error: {e}')
      print(f'  fsdp={fsdp!s:5}  params {m.params_bytes / 2**30:8.2f} GiB   optimizer '
            f'{m.optimizer_bytes / 2**30:8.2f} GiB   total {m.total_bytes / 2**30:8.2f} GiB   '
            f'(whole model {m.total_params_bytes / 2**30:.1f} GiB)')


if __name__ == '__main__':
  app.run(main)

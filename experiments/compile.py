"""Compiles the real train, prefill or decode step for a TPU slice on this machine (no TPU needed)
and prints its per-device memory against the chip's HBM, its FLOPs and its collectives: a table,
then one JSON line (the last line).

  python -m experiments.compile --config=experiments/configs/deepseek_v3.py --topology=v5p:8x8x16 \
      [--what=train|prefill|decode] [--param_dtype=bfloat16] [--config.mesh.expert=8 ...]

The batch is train.batch_size x train.seq_len (prefill and decode: that many sequences, a cache of
train.seq_len slots). A step that does not fit is reported with "fits": false (exit status 0).
Needs libtpu: pip install -e ".[tpu]". See deepseek_jax/analysis/compile.py.
"""

import os

# Before JAX is imported: compile on the CPU host for the topology's devices, ask no metadata
# server, and let another process hold libtpu at the same time.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/tiny.py',
                                          'Experiment config file.')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice, e.g. v5e:2x2, v5p:8x8x16, '
                                'tpu7x:4x4x8.', required=True)
_WHAT = flags.DEFINE_enum('what', 'train', ['train', 'prefill', 'decode'], 'Which step.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'],
                                 'Float parameters of prefill and decode (training: float32); '
                                 'weights kept in E4M3 (--config.model.fp8_weights) stay so.')


def main(argv):
  del argv
  # after the environment above; pylint: disable-next=import-outside-toplevel
  from deepseek_jax.analysis import compile as compile_lib
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  explicit = {name.split('.', 1)[1] for name in overrides if name.startswith('train.')}
  try:
    report = compile_lib.compile_report(_CONFIG.value, _TOPOLOGY.value, _WHAT.value, explicit,
                                        _PARAM_DTYPE.value)
  except (compile_lib.LibtpuMissing, ValueError) as e:
    sys.exit(f'error: {e}')
  print(compile_lib.format_report(report))
  print(json.dumps(report))


if __name__ == '__main__':
  app.run(main)

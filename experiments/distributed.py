"""Multi-process flags shared by the entry points (`experiments.run`, `eval`, `generate`):

  --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0   (1 on the other)

Without them `jax.distributed.initialize` still runs when JAX_COORDINATOR_ADDRESS is set (JAX
reads it, with JAX_COORDINATOR_PORT, JAX_COORDINATOR_BIND_ADDRESS and JAX_LOCAL_DEVICE_IDS), or
with --distributed; what is not given JAX detects on Slurm, Open MPI, Cloud TPU pods and
Kubernetes (JobSet).
"""

import os

from absl import flags

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0\'s coordinator (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s id, 0 .. n-1.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() even without the three flags above '
    '(JAX detects Slurm, Open MPI, Cloud TPU pods, Kubernetes).')


def initialize() -> None:
  """`jax.distributed.initialize` when asked for, before anything touches JAX's devices; CPU
  devices then talk over gloo (the setting only concerns the CPU backend)."""
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if (all(v is None for v in given) and not _DISTRIBUTED.value
      and not os.environ.get('JAX_COORDINATOR_ADDRESS')):
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(*given)

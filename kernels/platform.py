"""Which kernel runs where: `backend=None | 'triton' | 'mosaic_tpu'`, chosen by the platform being
lowered for, not by the host's default backend (`jax.default_backend()` is 'cpu' on a CPU host
compiling ahead of time for a TPU, and the TPU kernel must still be the one inside); and on a
mesh, whether XLA would have to partition a kernel call, which it cannot (`partitioned_axes`)."""

from __future__ import annotations

from typing import Callable

import jax

BACKENDS = (None, 'triton', 'mosaic_tpu')
PLATFORM_BACKENDS = {'gpu': 'triton', 'cuda': 'triton', 'rocm': 'triton', 'tpu': 'mosaic_tpu'}


def check_backend(backend: str | None, kernel: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f'{kernel}: backend={backend!r}, expected one of {BACKENDS}')


def host_backend() -> str | None:
  """The kernel backend for the host's default JAX backend: 'triton' on a GPU, 'mosaic_tpu' on a
  TPU, None elsewhere (no compiled kernel)."""
  return PLATFORM_BACKENDS.get(jax.default_backend())


def dispatch(backend: str | None, interpret: bool | None, triton: Callable, mosaic: Callable):
  """Run `triton(interpret=...)` or `mosaic(interpret=...)`.

  backend 'triton' / 'mosaic_tpu': that kernel. None: by the lowering platform
  (`jax.lax.platform_dependent`): Mosaic on TPU, Triton elsewhere (CUDA, ROCm; on CPU the Triton
  kernel in Pallas' generic interpreter). interpret None: interpret mode on CPU only, compiled
  elsewhere; True / False force it everywhere. interpret=True with Mosaic is Pallas' TPU
  interpret mode (TPU semantics checked on a CPU). Under None the CPU branch of a Mosaic kernel
  runs in the generic interpreter instead: TPU interpret mode works through ordered
  callbacks, and a `platform_dependent` holding them fails to lower for a TPU ("Lowering rule for
  `cond` returns incorrect set of output tokens", jax 0.10.2).
  """
  if backend is not None:
    if interpret is not None:
      return (triton if backend == 'triton' else mosaic)(interpret=interpret)
    if backend == 'triton':
      return jax.lax.platform_dependent(cpu=lambda: triton(interpret=True),
                                        default=lambda: triton(interpret=False))
    return jax.lax.platform_dependent(cpu=lambda: mosaic(interpret='generic'),
                                      default=lambda: mosaic(interpret=False))
  if interpret:  # no platform to pick by: the generic interpreter, as before backends existed
    return triton(interpret=True)
  branches = dict(tpu=lambda: mosaic(interpret=False), default=lambda: triton(interpret=False))
  if interpret is None:
    branches['cpu'] = lambda: triton(interpret=True)
  return jax.lax.platform_dependent(**branches)


def partitioned_axes() -> tuple[str, ...]:
  """The mesh axes of several devices that XLA partitions where this is traced: the `Auto` axes
  of the ambient mesh (`jax.set_mesh`), outside `jax.shard_map` (whose axes are manual). XLA
  cannot partition a compiled Pallas call (Mosaic or Triton), so where this is not empty a
  kernel runs per device only inside a shard_map over these axes."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(name for name, size in zip(mesh.axis_names, mesh.axis_sizes)
               if size > 1 and name in mesh.auto_axes)

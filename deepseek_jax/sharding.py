"""The (data, expert, plane) mesh and the one table from logical axis names to mesh axes.

DESIGN.md, "Sharding and the multi-plane mesh":
  plane   the device index inside a node (one GPU-NIC pair per network plane); traffic between
          planes crosses NVLink inside the node;
  expert  the nodes of one expert-parallel group; an all-to-all over `expert` at a fixed plane is
          inter-node traffic inside one plane;
  data    replicas of the expert-parallel group (gradient all-reduce).
Tokens (the batch) are sharded over all three axes, routed experts over ('expert', 'plane').
Every parameter carries logical axis names (`layers/param.py`); `rules(fsdp)` maps them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

AXES = ('data', 'expert', 'plane')
BATCH = AXES                 # the batch dimension of every activation is split over all three
EXPERTS = ('expert', 'plane')  # routed experts: node (expert) x device inside the node (plane)


def mesh_shape(data: int, expert: int, plane: int, num_devices: int) -> tuple[int, int, int]:
  """The axis sizes, one of which may be -1 (the devices left over); errors name the sizes."""
  sizes = {'data': data, 'expert': expert, 'plane': plane}
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'mesh {sizes}: at most one axis may be -1')
  for name, size in sizes.items():
    if size != -1 and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
      raise ValueError(f'mesh.{name}={size!r}: must be a positive integer or -1')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'mesh {sizes}: {num_devices} devices do not divide by the fixed axes\' '
                       f'product {fixed}')
    sizes[free[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total > num_devices:
    raise ValueError(f'mesh data={sizes["data"]} x expert={sizes["expert"]} x plane='
                     f'{sizes["plane"]} = {total} devices, but only {num_devices} are available')
  return sizes['data'], sizes['expert'], sizes['plane']


def make_mesh(data: int = -1, expert: int = 1, plane: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'expert', 'plane') mesh over the first data x expert x plane devices (all of
  them by default); Auto axis types, so jit propagates shardings through the model."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, expert, plane, len(devices))
  grid = np.asarray(devices[:math.prod(shape)], dtype=object).reshape(shape)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def rules(fsdp: bool = False) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Logical axis name -> mesh axes, for `nnx.logical_axis_rules` and `logical_spec`.

  Routed experts are split over ('expert', 'plane'); with `fsdp` the model dimension (`embed`)
  of every weight is split over `data` as well (ZeRO-3 style: gathered for use, gradients
  reduce-scattered by XLA), otherwise everything else is replicated.
  """
  return (
      ('expert', EXPERTS),
      ('embed', 'data' if fsdp else None),
      ('vocab', None), ('heads', None), ('head_dim', None), ('q_latent', None),
      ('kv_latent', None), ('rope', None), ('mlp', None), ('norm', None), ('mtp_in', None),
  )


def logical_spec(axes: Sequence[str | None], table) -> PartitionSpec:
  """A parameter's logical axis names -> its PartitionSpec under `table` (a mesh axis is used
  at most once: a later dimension that maps to an axis already taken stays replicated)."""
  mapping = dict(table)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = mapping.get(name) if name is not None else None
    if name is not None and name not in mapping:
      raise ValueError(f'logical axis {name!r} has no sharding rule; rules: {sorted(mapping)}')
    names = (target,) if isinstance(target, str) else tuple(target or ())
    if any(n in used for n in names):
      names = ()
    used.update(names)
    spec.append(names[0] if len(names) == 1 else (names or None))
  return PartitionSpec(*spec)

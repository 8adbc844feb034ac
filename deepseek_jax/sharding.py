"""The (data, expert, plane) mesh and the one table from logical axis names to mesh axes.

deepseek_jax/DESIGN.md, "Sharding and the multi-plane mesh":
  plane   the device index inside a node (one GPU-NIC pair per network plane); traffic between
          planes crosses NVLink inside the node;
  expert  the nodes of one expert-parallel group; an all-to-all over `expert` at a fixed plane is
          inter-node traffic inside one plane;
  data    replicas of the expert-parallel group (gradient all-reduce).
Tokens (the batch) are sharded over all three axes, routed experts over ('expert', 'plane').
Every parameter carries logical axis names (`layers/param.py`); `rules(fsdp)` maps them.

The train state's shardings come from those names: `variable_shardings` reads them from the nnx
Variables of an abstract (eval_shape) state, `mirror_shardings` gives each optimizer moment the
sharding of the parameter it mirrors (found by its key path), everything else is replicated.
The same shardings are the targets of `jax.jit(init, out_shardings=...)` (the state is created
in place, never on one device first) and of a checkpoint restore (so a state saved on one mesh
restores onto any other).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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

  Routed experts are split over ('expert', 'plane'); with `fsdp` every weight is split over
  `data` as well (ZeRO-3 style: gathered for use, gradients reduce-scattered by XLA) along its
  model dimension (`embed`), or where it has none along its latent one (`q_latent`,
  `kv_latent`: MLA's up-projections, 3.3B of V3's parameters); otherwise everything else is
  replicated.
  """
  return (
      ('expert', EXPERTS),
      ('embed', 'data' if fsdp else None),
      ('q_latent', 'data' if fsdp else None), ('kv_latent', 'data' if fsdp else None),
      ('vocab', None), ('heads', None), ('head_dim', None),
      ('rope', None), ('mlp', None), ('norm', None), ('mtp_in', None),
      ('layers', None),  # the stacks' leading axis (`model.scan_layers`): every device all layers
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


# ---- checks ----------------------------------------------------------------------------------

def check_mesh(mesh: Mesh, batch_size: int, n_routed_experts: int, n_group: int,
               fsdp_dims: dict[str, int | None] | None = None) -> None:
  """Errors (naming the sizes) for a batch, a MoE or (with FSDP) a dimension FSDP splits over
  data (`fsdp_dims`: model field -> size, e.g. {'hidden_size': 7168, 'q_lora_rank': 1536})
  that cannot be laid out on `mesh`."""
  data, expert, plane = (mesh.shape[name] for name in AXES)
  sizes = f'mesh data={data} x expert={expert} x plane={plane}'
  if batch_size % (data * expert * plane):
    raise ValueError(f'train.batch_size={batch_size} must divide by {sizes} = '
                     f'{data * expert * plane} (the batch is split over all three axes)')
  if n_routed_experts % (expert * plane):
    raise ValueError(f'model.n_routed_experts={n_routed_experts} must divide by expert={expert} '
                     f'x plane={plane} = {expert * plane} (routed experts are split over both)')
  if n_group % expert:
    raise ValueError(f'model.n_group={n_group} must divide by mesh expert={expert}: expert '
                     'groups map onto the nodes of the expert axis')
  for field, size in (fsdp_dims or {}).items():
    if size is not None and size % data:
      raise ValueError(f'model.{field}={size} must divide by mesh data={data} (fsdp splits it '
                       'over data)')


def fsdp_dims(cfg) -> dict[str, int | None]:
  """The model dimensions `rules(fsdp=True)` splits over data: `embed`, `q_latent`, `kv_latent`."""
  return {'hidden_size': cfg.hidden_size, 'q_lora_rank': cfg.q_lora_rank,
          'kv_lora_rank': cfg.kv_lora_rank}


# ---- shardings of the train state ------------------------------------------------------------

def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T] token arrays: rows split over data x expert x plane."""
  return NamedSharding(mesh, PartitionSpec(BATCH, None))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def variable_shardings(tree: Any, mesh: Mesh, table) -> Any:
  """NamedShardings in the structure of `tree` (arrays or ShapeDtypeStructs, e.g. an eval_shape
  of the model state): a leaf inside an nnx Variable gets the spec of the Variable's logical axis
  names (`out_sharding` metadata) under `table`; a leaf without names is replicated."""

  def one(variable):
    if not _is_variable(variable):
      return replicated(mesh)
    axes = variable.get_metadata().get('out_sharding')

    def leaf(x):
      if axes is None:
        return replicated(mesh)
      if len(axes) != len(x.shape):
        raise ValueError(f'logical axes {axes} for a value of shape {x.shape}')
      return NamedSharding(mesh, logical_spec(axes, table))

    return jax.tree.map(leaf, variable)

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def mirror_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for `tree` (an optimizer state): a leaf whose key path ends with a parameter's
  path and has its shape (Adam's mu and nu, ...) gets that parameter's sharding; the rest
  (step counts, scalars) is replicated. This is `optax.tree_map_params` by key path, which also
  works through `optax.partition` (whose init cannot run on optax's placeholder)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  targets = {tuple(path): (x.shape, s) for (path, x), s in
             zip(flat, jax.tree.leaves(param_shardings))}
  longest = max((len(k) for k in targets), default=0)

  def leaf(path, x):
    keys = tuple(path)
    for start in range(max(len(keys) - longest, 0), len(keys)):
      shape, sharding = targets.get(keys[start:], (None, None))
      if sharding is not None and shape == x.shape:
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def train_state_shardings(state: Any, mesh: Mesh, table) -> dict:
  """Shardings of the train state {'tree', 'opt', 'step'} (train/step.py), from its eval_shape:
  the parameters and router biases by their logical names, the optimizer state mirroring them,
  the step counter replicated."""
  tree = variable_shardings(state['tree'], mesh, table)
  return {'tree': tree, 'opt': mirror_shardings(state['opt'], state['tree'], tree, mesh),
          'step': replicated(mesh)}


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a jit or checkpoint-restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


# ---- host <-> global arrays ------------------------------------------------------------------

def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a global batch (process p holds rows [pB/P, (p+1)B/P), as
  `data/pipeline.py` produces them) -> global [B, ...] arrays; one process or several."""
  count = jax.process_count()
  out = {}
  for name, local in batch.items():
    global_shape = (local.shape[0] * count,) + local.shape[1:]
    rows = {index[0].indices(global_shape[0])[:2]
            for index in sharding.addressable_devices_indices_map(global_shape).values()}
    first, last = min(r[0] for r in rows), max(r[1] for r in rows)
    mine = (jax.process_index() * local.shape[0], (jax.process_index() + 1) * local.shape[0])
    if (first, last) != mine:  # the mesh's device order must follow the processes' data rows
      raise ValueError(f'process {jax.process_index()} holds batch rows [{mine[0]}, {mine[1]}) '
                       f'but its devices on the mesh take rows [{first}, {last})')
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def to_host(tree: Any) -> Any:
  """numpy copies of the arrays in `tree`, also of global arrays that span other processes
  (gathered: every process must call this at the same point)."""

  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)

"""Orbax checkpoints of a training run: the train state (params, router biases, optimizer state,
step), the data iterator's state and the model config, saved together, asynchronously.

A checkpoint whose model config differs from the run's in a field the parameters depend on, or
that cannot be read, is an error that names the directory and the problem; nothing in the workdir
is ever deleted by a failure. Implementation switches (`config.IMPLEMENTATION_FIELDS`: kernels,
grouped matmul, activation dtype, precision) may change on resume.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from deepseek_jax import model as model_lib
from deepseek_jax import sharding
from deepseek_jax.config import IMPLEMENTATION_FIELDS, ModelConfig


class Checkpoints:
  """`<directory>/<step>/` holds three items: `state` ({'tree': params and router biases,
  'opt': optimizer state, ...}), `data` (the iterator's state) and `meta` ({'model': config})."""

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    with _without_read_only_notices():
      if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
      else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    """The `meta` saved at `step` ({'model': the ModelConfig as a dict}). A checkpoint from
    before `scan_layers` existed has unrolled layers, and says `scan_layers: False` here."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many kinds for unreadable files
      raise ValueError(f'checkpoint {self.directory / str(step)} cannot be read '
                       f'({type(e).__name__}: {e})') from e
    if isinstance(meta.get('model'), dict):
      meta['model'] = {'scan_layers': False, **meta['model']}
    return meta

  def restore(self, step: int, abstract_state: Any, meta: dict) -> tuple[Any, dict]:
    """The state and data-iterator state saved at `step`; `meta['model']` must match the saved
    one in every field but the implementation switches."""
    where = self.directory / str(step)
    saved_meta = self.read_meta(step)
    mismatch = _differences(saved_meta.get('model', {}), meta.get('model', {}))
    if mismatch:
      layout = ''
      if any(m.startswith('model.scan_layers:') for m in mismatch):
        stacked = bool(saved_meta['model'].get('scan_layers'))
        layout = ('. The layouts differ: its decoder layers are '
                  f'{"stacked" if stacked else "one module each"}, so run with '
                  f'--config.model.scan_layers={stacked} (model.stack_layers and '
                  'model.unstack_layers convert a restored model)')
      raise ValueError(f'checkpoint {where} was written by a different model config: '
                       + '; '.join(mismatch) + layout
                       + '. Use another --workdir or the same config.')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise ValueError(f'checkpoint {where} cannot be restored ({type(e).__name__}: {e})') from e
    return restored.state, restored.data

  def restore_tree(self, step: int, abstract_tree: Any) -> Any:
    """Only `state['tree']` (parameters and router biases) saved at `step`, onto the shapes,
    dtypes and shardings of `abstract_tree`; the optimizer state is not read."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item={'tree': abstract_tree}, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args({'tree': abstract_tree}))))
    except Exception as e:  # orbax raises many kinds for unreadable files
      error = (f'checkpoint {self.directory / str(step)} cannot be restored '
               f'({type(e).__name__}: {e})')
    else:
      return restored.state['tree']
    # Raised outside the handler so the ValueError does not chain orbax's exception. Chained, the
    # 'Event loop is closed' warning that orbax's failed restore leaves behind was collected
    # during pytest's summary, where CPython 3.11.7 then failed with a SystemError (2026-11-29).
    raise ValueError(error)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def latest(directory: str | pathlib.Path) -> tuple[int, dict] | None:
  """(step, meta) of the latest checkpoint in `directory` (a run's `<workdir>/checkpoints`),
  None without one; creates nothing."""
  if not pathlib.Path(directory).is_dir():
    return None
  checkpoints = Checkpoints(directory, read_only=True)
  try:
    step = checkpoints.latest_step()
    return None if step is None else (step, checkpoints.read_meta(step))
  finally:
    checkpoints.close()


class Trained(NamedTuple):
  step: int
  cfg: ModelConfig            # the meta's
  model: model_lib.DeepSeekV3


def restore_model(directory: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                  rules=None) -> Trained | None:
  """The model of the latest checkpoint in `directory`, built from its meta's config: only the
  parameters and router biases are read (not the optimizer state), onto the first local device,
  or sharded over `mesh` by `rules` (default `sharding.rules()`) with each process reading its
  own blocks. None without a checkpoint."""
  if not pathlib.Path(directory).is_dir():
    return None
  checkpoints = Checkpoints(directory, read_only=True)
  try:
    step = checkpoints.latest_step()
    if step is None:
      return None
    cfg = ModelConfig.from_dict(checkpoints.read_meta(step)['model'])
    graphdef, tree, rest = model_lib.split_trainable(model_lib.abstract(cfg))
    if mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: device, tree)
    else:
      shardings = sharding.variable_shardings(tree, mesh, rules or sharding.rules())
    tree = checkpoints.restore_tree(step, sharding.with_shardings(tree, shardings))
  finally:
    checkpoints.close()
  return Trained(step, cfg, model_lib.merge_trainable(graphdef, tree, rest))


class _ReadOnlyNotice(logging.Filter):
  """Orbax warns twice that a read-only manager is read-only (every run reads its workdir's
  latest meta through one before it starts); those two lines say nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(('CheckpointManagerOptions.read_only=True',
                                           'Given directory is read only'))


@contextlib.contextmanager
def _without_read_only_notices():
  logger, notice = absl_logging.get_absl_logger(), _ReadOnlyNotice()
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


def _differences(saved: dict, wanted: dict) -> list[str]:
  """The fields the parameters depend on that differ, one 'model.<field>: ...' each."""
  keys = sorted((set(saved) | set(wanted)) - set(IMPLEMENTATION_FIELDS))
  return [f'model.{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}'
          for k in keys if saved.get(k) != wanted.get(k)]


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

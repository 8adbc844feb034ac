"""The training loop: data, model, optimizer, jitted step, metrics, eval, checkpoints, resume.

Rerunning with the same workdir resumes from the latest checkpoint, data iterator included, so
the losses from there on equal an uninterrupted run's. Metrics are read one step late (the host
never waits on the step it just dispatched); a non-finite loss stops the run with a message that
names the step, before that step's state can be checkpointed. SIGTERM saves and exits cleanly.

The run's ConfigDict becomes its typed `ModelConfig`, `TrainConfig` and `MeshConfig` once, in
`train.config.resolve`, which also fits step-valued fields to the step count and resolves
`bf16_moments`; each line it changed is printed.

The run lives on the ('data', 'expert', 'plane') mesh of `config.mesh` (deepseek_jax/sharding.py):
the train state is created in place with the shardings its logical axis names give, a checkpoint
restores onto this run's mesh whatever mesh wrote it, and every step runs under
`jax.set_mesh(mesh)` (the MoE layer's expert-parallel path reads it). With several processes
(`jax.distributed`, see experiments/run.py) each one feeds its rows of the global batch, all take
part in every step and checkpoint, and only process 0 prints and writes logs, plots and samples.

`config.init_from` starts a workdir from pretrained weights, and `convert` writes such a start as
a workdir's step-0 checkpoint; where the model config then comes from is train/pretrained.py's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import time
from typing import Any, Collection, NamedTuple

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from deepseek_jax import model as model_lib
from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax import checkpoint as ckpt_lib
from deepseek_jax.data import pipeline as data_lib
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train import pretrained
from deepseek_jax.train import report
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import MeshConfig, RunConfig, resolve


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step.

  With several processes the processes must stop at the same step (a checkpoint save is
  collective), so JAX's preemption sync service (started by `jax.distributed.initialize`, which
  catches SIGTERM itself) picks the step instead of a handler here.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def check(self, step: int) -> bool:
    """Whether to save and stop after `step` (call it at every step, in every process)."""
    if self._multi and not self.requested:
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is switched off: SIGTERM just ends the run
        pass
    return self.requested

  def restore(self):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)


def _jsonl_upto(path: pathlib.Path, step: int) -> list[dict]:
  """The rows of a .jsonl file up to `step`, rewriting the file without the later ones (written
  by a run that died after its last checkpoint: they belong to a future that is being redone)."""
  rows = []
  if path.exists():
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row['step'] <= step]
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  return rows


class _MetricsLog:
  """metrics.jsonl (one JSON object per logged step), expert_load.jsonl ([L_moe, E] per logged step)
  and TensorBoard events in the workdir; only in memory when not `enabled` (processes > 0)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int, enabled: bool = True):
    self.path, self.load_path = workdir / 'metrics.jsonl', workdir / 'expert_load.jsonl'
    self.enabled = enabled
    self.rows, self.loads, self._tb = [], [], None
    if not enabled:
      return
    self.rows = _jsonl_upto(self.path, resume_step)
    self.loads = [(row['step'], np.asarray(row['load']))
                  for row in _jsonl_upto(self.load_path, resume_step)]
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / 'tensorboard'))
    except ImportError:  # optional: metrics.jsonl has everything
      self._tb = None

  def write(self, row: dict) -> None:
    self.rows.append(row)
    if not self.enabled:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for name, value in row.items():
        if name != 'step' and isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, row['step'])

  def write_load(self, step: int, load: np.ndarray) -> None:
    self.loads.append((step, load))
    if not self.enabled:
      return
    with self.load_path.open('a') as f:
      f.write(json.dumps({'step': step, 'load': load.tolist()}) + '\n')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def replicated_bytes_per_token(tokenizer, mesh: jax.sharding.Mesh) -> jax.Array:
  """The tokenizer's UTF-8 bytes per token [V] (float32), replicated on `mesh`: `evaluate`'s
  denominator of bits per byte."""
  values = np.asarray(tokenizer.bytes_per_token, np.float32)
  return jax.make_array_from_process_local_data(sharding.replicated(mesh), values, values.shape)


def evaluate(eval_step, tree, batches: list[dict], bytes_per_token: jax.Array) -> dict[str, float]:
  nats = tokens = num_bytes = 0.0
  for batch in batches:
    n, t, b = sharding.to_host(eval_step(tree, batch, bytes_per_token))
    nats, tokens, num_bytes = nats + float(n), tokens + float(t), num_bytes + float(b)
  return {'eval_loss': nats / max(tokens, 1.0),
          'eval_bpb': data_lib.bits_per_byte(nats, num_bytes)}


def build_mesh(mesh_cfg: MeshConfig, cfg: ModelConfig, batch_size: int,
               devices=None) -> tuple[jax.sharding.Mesh, tuple]:
  """The run's mesh (over `devices`, default all of this process's view, e.g. a TPU topology's
  for ahead-of-time compilation) and rules table, checked against the model and the batch."""
  mesh = sharding.make_mesh(mesh_cfg.data, mesh_cfg.expert, mesh_cfg.plane, devices)
  sharding.check_mesh(mesh, batch_size, cfg.n_routed_experts, cfg.n_group,
                      sharding.fsdp_dims(cfg) if mesh_cfg.fsdp else None)
  return mesh, sharding.rules(mesh_cfg.fsdp)


def mesh_from_config(config, cfg: ModelConfig,
                     batch_size: int) -> tuple[jax.sharding.Mesh, tuple]:
  """`build_mesh` from a run ConfigDict's `mesh` section (MeshConfig's defaults when absent)."""
  return build_mesh(MeshConfig.from_dict(config.mesh.to_dict() if config.get('mesh') else {}),
                    cfg, batch_size)


def prepare_data(config, workdir: pathlib.Path, vocab_size: int,
                 tokenizer: pathlib.Path | None = None) -> data_lib.Data:
  """`data_lib.prepare`, process 0 first: it copies `tokenizer` (pretrained weights' own) into
  the workdir, or trains and saves a BPE tokenizer there, which the other processes then load
  instead of writing the same file at the same time."""
  if jax.process_index() == 0:
    if tokenizer is not None:
      pretrained.copy_tokenizer(tokenizer, workdir)
    data = data_lib.prepare(config.data, str(workdir), vocab_size)
  if jax.process_count() == 1:
    return data
  multihost_utils.sync_global_devices('deepseek_jax: data prepared')
  if jax.process_index() != 0:
    data = data_lib.prepare(config.data, str(workdir), vocab_size)
  return data


@dataclasses.dataclass
class _Session:
  """What a run builds before its first step: typed configs, mesh, data, state, compiled steps."""
  run: RunConfig
  workdir: pathlib.Path
  lead: bool                     # process 0: prints and writes logs, plots and samples
  mesh: jax.sharding.Mesh
  data: data_lib.Data
  iterator: Any                  # the training batches (grain iterator, checkpointed)
  eval_set: list                 # held-out batches, on the mesh
  bytes_per_token: jax.Array     # replicated, for bits per byte
  checkpoints: ckpt_lib.Checkpoints
  meta: dict                     # saved with every checkpoint, checked on restore
  graphdef: Any
  rest: Any                      # the model's non-trainable state
  state: dict                    # the train state ({'tree', 'opt', 'step'}), on the mesh
  start: int                     # the step the state is at
  train_step: Any
  eval_step: Any


class TrainStateLayout(NamedTuple):
  """What the train state will be on a mesh, before any of it exists (`train_state_layout`)."""
  tx: Any              # the optimizer
  init: Any            # init() -> (train state, rest), `step.initializer`
  graphdef: Any
  state: dict          # the train state's eval_shape (nnx Variables carry the logical names)
  rest: Any            # the non-trainable rest's eval_shape
  shardings: dict      # of the train state, `sharding.train_state_shardings`
  rest_shardings: Any


def train_state_layout(run: RunConfig, seed: int, mesh, table) -> TrainStateLayout:
  """The optimizer, initializer, abstract train state and its shardings on `mesh` under `table`:
  what the loop creates or restores the state onto and jits its step with (and what
  `analysis.compile` compiles ahead of time). Call it outside `jax.set_mesh`."""
  if run.model.fp8_weights:
    raise ValueError('ModelConfig.fp8_weights=True: weights kept in E4M3 are for inference (they '
                     "have no gradient); training keeps float32 masters, which precision='fp8' "
                     'quantizes online')
  tx = opt_lib.make_optimizer(run.train)
  init = step_lib.initializer(run.model, seed, tx)
  abstract_state, abstract_rest = jax.eval_shape(init)
  shardings = sharding.train_state_shardings(abstract_state, mesh, table)
  rest_shardings = sharding.variable_shardings(abstract_rest, mesh, table)
  graphdef = model_lib.split_trainable(model_lib.abstract(run.model))[0]
  return TrainStateLayout(tx, init, graphdef, abstract_state, abstract_rest, shardings,
                          rest_shardings)


def _restore_or_create(run: RunConfig, seed: int, mesh, table, checkpoints: ckpt_lib.Checkpoints,
                       iterator, lead: bool, meta: dict, source: pretrained.Source | None = None):
  """(graphdef, rest, state, start, shardings, tx): the latest checkpoint's state (and iterator
  position) restored onto `mesh`, or a fresh state created in place on it: initialised, or
  `source`'s weights with a fresh optimizer."""
  tx, init, graphdef, abstract_state, _, shardings, rest_shardings = train_state_layout(
      run, seed, mesh, table)
  start = checkpoints.latest_step()
  if start is None and source is not None:
    rest = jax.jit(lambda: init()[1], out_shardings=rest_shardings)()
    state = pretrained.initial_state(source, run.model, tx, abstract_state, shardings, mesh, table)
  elif start is None:  # created in place on the mesh
    state, rest = jax.jit(init, out_shardings=(shardings, rest_shardings))()
  else:
    rest = jax.jit(lambda: init()[1], out_shardings=rest_shardings)()
    state, data_state = checkpoints.restore(
        start, sharding.with_shardings(abstract_state, shardings), meta)
    if data_state:  # `convert`'s step 0 has none: the iterator starts at the first batch
      iterator.set_state(data_state)
    if lead:
      print(f'resumed from {checkpoints.directory / str(start)}')
  return graphdef, rest, state, start or 0, shardings, tx


def _meta(run: RunConfig, origin: str | None = None) -> dict:
  """Saved with every checkpoint: the model config (not the mesh: a checkpoint restores onto
  any mesh) and, for weights that began as pretrained ones, their source."""
  return {'model': run.model.to_dict(), **({'init_from': origin} if origin else {})}


def convert(config, hf_dir: str | pathlib.Path, workdir: str | pathlib.Path,
            explicit_model: Collection[str] = ()) -> pathlib.Path:
  """`experiments.convert`: what `--config.init_from=hf:<hf_dir>` starts from (the Hugging
  Face weights, a fresh optimizer, step 0) saved as `workdir`'s step-0 checkpoint, with the
  directory's tokenizer.json copied beside it (unless `data.tokenizer='byte'`, as at such a
  start); `train` on the workdir continues from there.
  `config` is the one the workdir will train with (its optimizer state must fit). Returns the
  checkpoint's directory."""
  workdir = pathlib.Path(workdir).absolute()
  run = resolve(config)
  if pretrained.latest_meta(workdir) is not None:
    raise ValueError(f'{workdir / "checkpoints"} already holds a checkpoint: convert into a '
                     'new workdir')
  start = pretrained.plan(run, f'{pretrained.HF_PREFIX}{hf_dir}',
                          config.data.get('tokenizer', 'byte'), workdir, explicit_model)
  run, lead = start.run, jax.process_index() == 0
  if lead:
    for note in start.notes:
      print(note)
  mesh, table = build_mesh(run.mesh, run.model, run.train.batch_size)
  layout = train_state_layout(run, config.seed, mesh, table)
  state = pretrained.initial_state(start.source, run.model, layout.tx, layout.state,
                                   layout.shardings, mesh, table)
  workdir.mkdir(parents=True, exist_ok=True)
  if lead and start.tokenizer is not None:
    pretrained.copy_tokenizer(start.tokenizer, workdir)
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', run.train.keep_checkpoints)
  try:
    checkpoints.save(0, state, {}, _meta(run, start.origin))
    checkpoints.wait()
  finally:
    checkpoints.close()
  return checkpoints.directory / '0'


def start_session(config, workdir: str | pathlib.Path, explicit: Collection[str] = (),
                  explicit_model: Collection[str] = ()) -> _Session:
  """Resolves the configs (printing what was fitted), builds the mesh, the data and the train
  state (restored from the workdir's latest checkpoint if there is one, else from
  `config.init_from`'s weights if given) and the jitted steps. `explicit_model`: the `model.*`
  fields set on the command line, which pretrained weights may not overrule."""
  workdir = pathlib.Path(workdir)
  run = resolve(config, explicit)
  start = pretrained.plan(run, config.get('init_from') or '', config.data.get('tokenizer', 'byte'),
                          workdir, explicit_model)
  run = start.run
  process_index, process_count = jax.process_index(), jax.process_count()
  lead = process_index == 0
  if lead:
    for note in run.notes + start.notes:
      print(note)
  t = run.train
  mesh, table = build_mesh(run.mesh, run.model, t.batch_size)
  workdir.mkdir(parents=True, exist_ok=True)
  data = prepare_data(config, workdir, run.model.vocab_size, start.tokenizer)
  iterator = data_lib.train_iterator(data.train_tokens, t.seq_len, t.batch_size, config.seed,
                                     process_index, process_count)
  eval_set = data_lib.eval_batches(data.heldout_tokens, t.seq_len, t.batch_size,
                                   t.eval_batches, process_index, process_count)
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', t.keep_checkpoints)
  meta = _meta(run, start.origin)
  graphdef, rest, state, step, shardings, tx = _restore_or_create(
      run, config.seed, mesh, table, checkpoints, iterator, lead, meta, start.source)
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = step_lib.make_train_step(graphdef, rest, run.model, t, tx, shardings,
                                        batch_sharding)
  eval_step = step_lib.make_eval_step(graphdef, rest, shardings['tree'], batch_sharding)
  eval_set = [sharding.put_batch(batch, batch_sharding) for batch in eval_set]
  bytes_per_token = replicated_bytes_per_token(data.tokenizer, mesh)
  return _Session(run, workdir, lead, mesh, data, iterator, eval_set, bytes_per_token,
                  checkpoints, meta, graphdef, rest, state, step, train_step, eval_step)


class _Reader:
  """Reads a dispatched step's metrics (one step late): the non-finite check, tokens/s since the
  last read, and the logging of the steps `log_every` selects."""

  def __init__(self, s: _Session, log: _MetricsLog, last: dict):
    self.train, self.checkpoints, self.log, self.last = s.run.train, s.checkpoints, log, last
    self.clock, self.clock_step = time.perf_counter(), s.start

  def check_finite(self, item) -> dict[str, float]:
    step, metrics, _ = item
    metrics = {k: float(v) for k, v in sharding.to_host(metrics).items()}
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
      raise FloatingPointError(f'non-finite metrics at step {step}: {bad}; the last good '
                               f'checkpoint is in {self.checkpoints.directory}')
    return metrics

  def log_pending(self, pending, bar) -> None:
    """Logs the dispatched step's metrics and expert load if it is a logging step."""
    if pending is None or pending[0] % self.train.log_every:
      return
    step, _, expert_load = pending
    metrics = self.check_finite(pending)
    now = time.perf_counter()
    tokens_per_step = self.train.batch_size * self.train.seq_len
    metrics['tokens_per_s'] = (tokens_per_step * (step - self.clock_step)
                               / max(now - self.clock, 1e-9))
    self.clock, self.clock_step = now, step
    row = {'step': step, **metrics}
    self.log.write(row)
    self.log.write_load(step, sharding.to_host(expert_load))
    self.last.update(row)
    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")


def run_steps(s: _Session, log: _MetricsLog, last: dict) -> bool:
  """Steps from `s.start` to `train.steps` (s.state follows), with evals, checkpoints and the
  metrics of each step read one step late; returns whether SIGTERM stopped it (after a save)."""
  t = s.run.train
  reader = _Reader(s, log, last)
  preemption = _Preemption()
  pending = None  # (step, metrics, expert_load) dispatched but not read yet
  bar = tqdm.tqdm(total=t.steps, initial=s.start, desc='train', unit='step', dynamic_ncols=True,
                  disable=not s.lead)
  preempted = False
  batch_sharding = sharding.batch_sharding(s.mesh)
  try:
    with jax.set_mesh(s.mesh):
      for step in range(s.start + 1, t.steps + 1):
        batch = sharding.put_batch(next(s.iterator), batch_sharding)
        s.state, (metrics, expert_load) = s.train_step(s.state, batch)
        reader.log_pending(pending, bar)  # the previous step's: reading never waits on this one
        pending = (step, metrics, expert_load)
        bar.update(1)
        preempted = preemption.check(step)
        at_end = step == t.steps or preempted
        if step % t.eval_every == 0 or at_end:
          row = {'step': step, **evaluate(s.eval_step, s.state['tree'], s.eval_set,
                                          s.bytes_per_token)}
          log.write(row)
          last.update(row)
        if step % t.checkpoint_every == 0 or at_end:
          reader.check_finite(pending)  # never checkpoint a state whose loss is not finite
          s.checkpoints.save(step, s.state, s.iterator.get_state(), s.meta)
        if preempted:
          if s.lead:
            print(f'SIGTERM: saved step {step} in {s.checkpoints.directory}; exiting')
          break
      reader.log_pending(pending, bar)
  finally:
    bar.close()
    s.checkpoints.wait()
    s.checkpoints.close()
    preemption.restore()
  return preempted


def finish(s: _Session, log: _MetricsLog, last: dict) -> None:
  """Process 0 writes the text sample (into `last` and sample.txt) and training.png."""
  tree, rest = s.state['tree'], s.rest
  if jax.process_count() > 1:  # the sample runs in process 0 alone, on its first device
    tree, rest = sharding.to_host(tree), sharding.to_host(rest)
  if s.lead:
    t = s.run.train
    model = model_lib.merge_trainable(s.graphdef, tree, rest)
    last['sample'] = report.sample(model, s.data.tokenizer, t.sample_prompt, t.sample_tokens)
    report.plot(log.rows, log.loads, s.workdir / 'training.png')
    (s.workdir / 'sample.txt').write_text(last['sample'])


def train(config, workdir: str | pathlib.Path, explicit: Collection[str] = (),
          explicit_model: Collection[str] = ()) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir`; returns the last logged metrics and eval.
  `explicit`: the `train.*` fields given on the command line, which `resolve` never changes;
  `explicit_model`: the `model.*` ones (pretrained weights may not overrule them)."""
  session = start_session(config, workdir, explicit, explicit_model)
  log = _MetricsLog(session.workdir, session.start, enabled=session.lead)
  last: dict[str, Any] = {}
  try:
    preempted = run_steps(session, log, last)
  finally:
    log.close()
  if not preempted:
    finish(session, log, last)
  return last

"""The training loop: data, model, optimizer, jitted step, metrics, eval, checkpoints, resume.

Rerunning with the same workdir resumes from the latest checkpoint, data iterator included, so
the losses from there on equal an uninterrupted run's. Metrics are read one step late (the host
never waits on the step it just dispatched); a non-finite loss stops the run with a message that
names the step, before that step's state can be checkpointed. SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.train import checkpoint as ckpt_lib
from deepseek_jax.train import data as data_lib
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train import report
from deepseek_jax.train import step as step_lib


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
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
  """metrics.jsonl (one JSON object per logged step), expert_load.jsonl ([M, E] per logged step)
  and TensorBoard events in the workdir."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path, self.load_path = workdir / 'metrics.jsonl', workdir / 'expert_load.jsonl'
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
    with self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for name, value in row.items():
        if name != 'step' and isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, row['step'])

  def write_load(self, step: int, load: np.ndarray) -> None:
    self.loads.append((step, load))
    with self.load_path.open('a') as f:
      f.write(json.dumps({'step': step, 'load': load.tolist()}) + '\n')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def evaluate(eval_step, tree, batches: list[dict], bytes_per_token: jax.Array) -> dict[str, float]:
  nats = tokens = num_bytes = 0.0
  for batch in batches:
    n, t, b = jax.device_get(eval_step(tree, batch, bytes_per_token))
    nats, tokens, num_bytes = nats + float(n), tokens + float(t), num_bytes + float(b)
  return {'eval_loss': nats / max(tokens, 1.0),
          'eval_bpb': data_lib.bits_per_byte(nats, num_bytes)}


def train(config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir`; returns the last logged metrics and eval."""
  workdir = pathlib.Path(workdir)
  cfg = ModelConfig.from_dict(config.model.to_dict())
  t = config.train
  if cfg.precision == 'fp8' and not t.bf16_moments:
    t = ml_collections.ConfigDict(t.to_dict())
    t.bf16_moments = True  # V3 §3.3: the FP8 recipe keeps AdamW's moments in BF16
  workdir.mkdir(parents=True, exist_ok=True)
  data = data_lib.prepare(config.data, str(workdir), cfg.vocab_size)
  process_index, process_count = jax.process_index(), jax.process_count()
  iterator = data_lib.train_iterator(data.train_tokens, t.seq_len, t.batch_size, config.seed,
                                     process_index, process_count)
  eval_set = data_lib.eval_batches(data.heldout_tokens, t.seq_len, t.batch_size,
                                   t.eval_batches, process_index, process_count)

  model = model_lib.create(cfg, config.seed)
  graphdef, tree, rest = opt_lib.split_trainable(model)
  tx = opt_lib.make_optimizer(t)
  state = step_lib.init_state(tree, tx)
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', t.keep_checkpoints)
  meta = {'model': cfg.to_dict()}
  start = checkpoints.latest_step()
  if start is not None:
    state, data_state = checkpoints.restore(start, ckpt_lib.abstract(state), meta)
    iterator.set_state(data_state)
    print(f'resumed from {checkpoints.directory / str(start)}')
  start = start or 0
  log = _MetricsLog(workdir, start)
  train_step = step_lib.make_train_step(graphdef, rest, cfg, t, tx)
  eval_step = step_lib.make_eval_step(graphdef, rest)
  bytes_per_token = jax.numpy.asarray(data.tokenizer.bytes_per_token, jax.numpy.float32)
  tokens_per_step = t.batch_size * t.seq_len

  preemption = _Preemption()
  pending = None  # (step, metrics, expert_load) dispatched but not read yet
  last: dict[str, Any] = {}
  clock, clock_step = time.perf_counter(), start

  def check_finite(item) -> dict[str, float]:
    step, metrics, _ = item
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
      raise FloatingPointError(f'non-finite metrics at step {step}: {bad}; the last good '
                               f'checkpoint is in {checkpoints.directory}')
    return metrics

  def read(item) -> tuple[dict[str, Any], np.ndarray]:
    nonlocal clock, clock_step
    step, _, expert_load = item
    metrics = check_finite(item)
    now = time.perf_counter()
    metrics['tokens_per_s'] = tokens_per_step * (step - clock_step) / max(now - clock, 1e-9)
    clock, clock_step = now, step
    return {'step': step, **metrics}, np.asarray(jax.device_get(expert_load))

  bar = tqdm.tqdm(total=t.steps, initial=start, desc='train', unit='step', dynamic_ncols=True)

  def log_pending():
    """Logs the dispatched step's metrics and expert load if it is a logging step."""
    if pending is None or pending[0] % t.log_every:
      return
    row, load = read(pending)
    log.write(row)
    log.write_load(row['step'], load)
    last.update(row)
    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")

  try:
    for step in range(start + 1, t.steps + 1):
      batch = next(iterator)
      state, (metrics, expert_load) = train_step(state, batch)
      log_pending()  # the previous step's metrics: reading them never waits on this step
      pending = (step, metrics, expert_load)
      bar.update(1)
      at_end = step == t.steps or preemption.requested
      if step % t.eval_every == 0 or at_end:
        row = {'step': step, **evaluate(eval_step, state['tree'], eval_set, bytes_per_token)}
        log.write(row)
        last.update(row)
      if step % t.checkpoint_every == 0 or at_end:
        check_finite(pending)  # never checkpoint a state whose loss is not finite
        checkpoints.save(step, state, iterator.get_state(), meta)
      if preemption.requested:
        print(f'SIGTERM: saved step {step} in {checkpoints.directory}; exiting')
        break
    log_pending()
  finally:
    bar.close()
    checkpoints.wait()
    checkpoints.close()
    log.close()
    preemption.restore()
  if not preemption.requested:
    model = opt_lib.merge_trainable(graphdef, state['tree'], rest)
    last['sample'] = report.sample(model, data.tokenizer, t.sample_prompt, t.sample_tokens)
    report.plot(log.rows, log.loads, workdir / 'training.png')
    (workdir / 'sample.txt').write_text(last['sample'])
  return last

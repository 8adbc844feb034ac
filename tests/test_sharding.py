"""Sharded training on the (data, expert, plane) mesh against the single-device run: one step's
loss and gradients and 20 steps' losses on four meshes; a checkpoint saved on one mesh restores
onto another and onto one device with the next step's loss unchanged; parameters and optimizer
moments are really split; bad layouts fail naming the sizes; two processes of four CPU devices
train like one process of eight (gloo collectives) and leave a checkpoint one process resumes."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_jax import model as model_lib
from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax import checkpoint as ckpt_lib
from deepseek_jax.data import pipeline as data_lib
from deepseek_jax.train import loop
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train import step as step_lib
from tests import processes as processes_lib
from experiments.configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 16 experts in 8 groups: expert x plane up to 8 divides the experts, expert up to 8 the groups.
MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, first_k_dense=1, num_heads=2,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=16,
             kv_lora_rank=16, intermediate_size=48, moe_intermediate_size=16,
             n_routed_experts=16, num_experts_per_tok=2, n_group=8, topk_group=2, mtp_depth=0,
             dtype='float32')
# min_lr_ratio 1: a constant rate after warm-up, so a run of 20 steps is the start of one of 22.
TRAIN = dict(steps=22, batch_size=8, seq_len=16, warmup_steps=2, learning_rate=3e-3,
             min_lr_ratio=1.0, log_every=1, eval_every=1000, checkpoint_every=1000,
             eval_batches=1, sample_tokens=0)  # no sample: one compile less per run
STEPS = 20  # compared on every mesh; the runs go 2 steps further for the resumed checkpoint
MESHES = [(1, 1, 8), (1, 2, 4), (2, 2, 2), (8, 1, 1)]


def small_config(corpus: pathlib.Path, steps: int = STEPS + 2):
  config = tiny.get_config()
  config.model.update(MODEL)
  config.train.update(TRAIN)
  config.train.steps = steps
  config.data.update(dict(path=str(corpus), tokenizer='byte', heldout_fraction=0.25))
  return config


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  """40 small text files (pieces of a standard-library module): quick to read, something to
  learn in 20 steps, and some held out for the loop's evaluation."""
  directory = tmp_path_factory.mktemp('corpus')
  text = pathlib.Path(os.__file__).read_text()
  size = len(text) // 40
  for i in range(40):
    (directory / f'{i:02d}.txt').write_text(text[i * size:(i + 1) * size])
  return directory


# Partitioning and collectives are XLA's HLO passes, which run in full; LLVM's optimisation of
# the CPU code only costs compile time here (half of each compile), so the tests skip it.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def compiled(fn, *args):
  return fn.lower(*args).compile(FAST_COMPILE)


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Setup:
  """The model, optimizer and batches every run shares; the jitted pieces of one mesh."""

  def __init__(self, corpus: pathlib.Path):
    config = small_config(corpus)
    self.cfg = ModelConfig.from_dict(config.model.to_dict())
    self.train = config.train
    self.tx = opt_lib.make_optimizer(self.train)
    self.init = step_lib.initializer(self.cfg, config.seed, self.tx)
    self.abstract, _ = jax.eval_shape(self.init)
    self.graphdef = model_lib.split_trainable(model_lib.abstract(self.cfg))[0]
    # The reference starts where the loop did before meshes: an eager model on one device.
    _, tree, self.rest = model_lib.split_trainable(model_lib.create(self.cfg, config.seed))
    self.initial = jax.device_get(step_lib.init_state(tree, self.tx))
    # The batches `loop.train` reads for this config, in one process.
    data = data_lib.prepare(config.data, None, self.cfg.vocab_size)
    self.iterator = lambda: data_lib.train_iterator(
        data.train_tokens, self.train.seq_len, self.train.batch_size, config.seed)
    iterator = self.iterator()
    self.batches = [next(iterator) for _ in range(STEPS + 2)]

  def shardings(self, mesh, fsdp: bool = False) -> dict:
    return sharding.train_state_shardings(self.abstract, mesh, sharding.rules(fsdp))

  def create(self, mesh, fsdp: bool = False) -> dict:
    """The state created in place on `mesh` (as `loop.train` does)."""
    return jax.jit(lambda: self.init()[0], out_shardings=self.shardings(mesh, fsdp))()

  def place(self, mesh) -> dict:
    """The reference's initial state put onto `mesh` (one init compile less per mesh)."""
    return jax.device_put(self.initial, self.shardings(mesh))

  def grads_fn(self, mesh=None):
    def fn(tree, batch, step):
      return step_lib.loss_and_grads(self.graphdef, self.rest, self.train, tree, batch, step)
    if mesh is None:
      return jax.jit(fn)
    return jax.jit(fn, in_shardings=(self.shardings(mesh)['tree'], sharding.batch_sharding(mesh),
                                     sharding.replicated(mesh)))

  def train_step(self, mesh=None):
    if mesh is None:
      return step_lib.make_train_step(self.graphdef, self.rest, self.cfg, self.train, self.tx)
    return step_lib.make_train_step(self.graphdef, self.rest, self.cfg, self.train, self.tx,
                                    self.shardings(mesh), sharding.batch_sharding(mesh))


@pytest.fixture(scope='module')
def setup(corpus):
  return Setup(corpus)


def meta(setup):
  return {'model': setup.cfg.to_dict()}


@pytest.fixture(scope='module')
def reference(setup):
  """The single-device run without any mesh: one step's loss and gradients, 22 losses."""
  state = jax.device_put(setup.initial, jax.devices()[0])
  (loss, _), grads = compiled(setup.grads_fn(), state['tree'], setup.batches[0],
                              state['step'])(state['tree'], setup.batches[0], state['step'])
  step = compiled(setup.train_step(), state, setup.batches[0])
  losses = []
  for batch in setup.batches:
    state, (metrics, _) = step(state, batch)
    losses.append(float(metrics['loss']))
  return {'loss': float(loss), 'grads': jax.device_get(grads), 'losses': losses, 'step': step}


@pytest.fixture(scope='module')
def sharded_runs(setup, tmp_path_factory):
  """`run(mesh_shape)`: one step's loss and gradients and 22 steps on that mesh (run once), and
  the compiled train step; the (2, 2, 2) run also saves its state after step 10."""
  cache, directory = {}, tmp_path_factory.mktemp('checkpoints')

  def run(shape):
    if shape in cache:
      return cache[shape]
    mesh = sharding.make_mesh(*shape)
    state = setup.place(mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    out = {'mesh': mesh}
    with jax.set_mesh(mesh):  # compiled under the mesh: the MoE layer goes expert-parallel
      batch = sharding.put_batch(setup.batches[0], batch_sharding)
      args = (state['tree'], batch, state['step'])
      (loss, _), grads = compiled(setup.grads_fn(mesh), *args)(*args)
      out['loss'], out['grads'] = float(loss), jax.device_get(grads)
      step, losses = compiled(setup.train_step(mesh), state, batch), []
      for i, batch in enumerate(setup.batches, start=1):
        state, (metrics, _) = step(state, sharding.put_batch(batch, batch_sharding))
        losses.append(float(metrics['loss']))
        if shape == (2, 2, 2) and i == 10:
          checkpoints = ckpt_lib.Checkpoints(directory, async_save=False)
          checkpoints.save(10, state, {}, meta(setup))
          checkpoints.close()
          out['saved'] = jax.device_get(state)
    out.update(losses=losses, state=state, directory=directory, step=step)
    cache[shape] = out
    return out

  return run


@pytest.mark.parametrize('shape', MESHES, ids=['x'.join(map(str, s)) for s in MESHES])
def test_sharded_training_equals_single_device(shape, setup, reference, sharded_runs):
  run = sharded_runs(shape)
  assert rel(run['loss'], reference['loss']) <= 1e-5
  flat = jax.tree_util.tree_flatten_with_path(run['grads'])[0]
  want = jax.tree.leaves(reference['grads'])
  assert len(flat) == len(want) > 20
  for (path, got), expected in zip(flat, want):
    assert rel(got, expected) <= 1e-5, jax.tree_util.keystr(path)
  np.testing.assert_allclose(run['losses'][:STEPS], reference['losses'][:STEPS], rtol=1e-4)
  assert reference['losses'][STEPS - 1] < reference['losses'][0] - 0.5  # it learns


def test_checkpoint_restores_onto_another_mesh_and_one_device(setup, reference, sharded_runs):
  run = sharded_runs((2, 2, 2))
  checkpoints = ckpt_lib.Checkpoints(run['directory'], read_only=True)
  batch = setup.batches[10]  # step 11's

  # (1, 8, 1): experts now 2 per device on `expert` instead of 4 per (expert, plane) pair.
  mesh = sharding.make_mesh(1, 8, 1)
  target = sharding.with_shardings(setup.abstract, setup.shardings(mesh))
  state, _ = checkpoints.restore(10, target, meta(setup))
  w_gate = state['tree']['params']['layers'][1]['ffn']['w_gate'][...]
  assert {s.data.shape for s in w_gate.addressable_shards} == {(2, 32, 16)}
  with jax.set_mesh(mesh):
    batch_on_mesh = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    _, (metrics, _) = compiled(setup.train_step(mesh), state, batch_on_mesh)(state, batch_on_mesh)
  assert rel(metrics['loss'], run['losses'][10]) <= 1e-5

  # One device, stepped by the reference's own (mesh-less) train step.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = sharding.with_shardings(setup.abstract,
                                   jax.tree.map(lambda _: device, setup.shardings(mesh)))
  state, _ = checkpoints.restore(10, target, meta(setup))
  checkpoints.close()
  for got, saved in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(run['saved'])):
    np.testing.assert_array_equal(got, saved)  # the bytes that were saved, optimizer included
  _, (metrics, _) = reference['step'](state, batch)
  assert rel(metrics['loss'], run['losses'][10]) <= 1e-5


def test_parameters_and_moments_are_split(setup, sharded_runs):
  state = sharded_runs((1, 2, 4))['state']
  params = state['tree']['params']
  w_gate = params['layers'][1]['ffn']['w_gate'][...]  # [E=16, D=32, F=16] over expert x plane
  shards = w_gate.addressable_shards
  assert len(shards) == 8 and {s.data.shape for s in shards} == {(2, 32, 16)}
  assert len({s.index[0].start for s in shards}) == 8  # eight different pairs of experts
  bias = state['tree']['router_bias']['layers'][1]['ffn']['router_bias'][...]
  assert {s.data.shape for s in bias.addressable_shards} == {(2,)}
  dense = params['layers'][0]['ffn']['w_gate'][...]  # a dense FFN: replicated
  assert {s.data.shape for s in dense.addressable_shards} == {dense.shape}
  adam = state['opt'].inner_states['adamw'].inner_state[1]
  for moment in (adam.mu, adam.nu):
    moment = moment['params']['layers'][1]['ffn']['w_gate'][...]
    assert moment.sharding == w_gate.sharding
  assert state['step'].sharding.is_fully_replicated


def test_fsdp_splits_embed_over_data_and_init_equals_eager(setup):
  """`loop.train`'s initialisation: one jit with out_shardings, each device making its shards."""
  mesh = sharding.make_mesh(8, 1, 1)
  state = setup.create(mesh, fsdp=True)
  embed = state['tree']['params']['embed'][...]  # [V=256, D=32], D is 'embed'
  assert {s.data.shape for s in embed.addressable_shards} == {(256, 4)}
  w_gate = state['tree']['params']['layers'][1]['ffn']['w_gate'][...]  # (expert, embed, mlp)
  assert {s.data.shape for s in w_gate.addressable_shards} == {(16, 4, 16)}
  # MLA's up-projections have no `embed` dimension: FSDP splits their latent one.
  w_uk = state['tree']['params']['layers'][1]['attn']['w_uk'][...]  # [C=16, N, H]
  assert {s.data.shape[0] for s in w_uk.addressable_shards} == {2}
  # Created in place on the mesh, with the values of an eager creation on one device.
  for got, want in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(setup.initial)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('mesh, change, message', [
    (dict(data=2, expert=2, plane=2), dict(train=dict(batch_size=12)),
     r'batch_size=12 must divide by mesh data=2 x expert=2 x plane=2 = 8'),
    (dict(data=1, expert=1, plane=8), dict(model=dict(n_routed_experts=12, n_group=4)),
     r'n_routed_experts=12 must divide by expert=1 x plane=8 = 8'),
    (dict(data=1, expert=8, plane=1), dict(model=dict(n_group=4)),
     r'n_group=4 must divide by mesh expert=8'),
    (dict(data=4, expert=2, plane=2), {},
     r'data=4 x expert=2 x plane=2 = 16 devices, but only 8 are available'),
    (dict(data=-1, expert=1, plane=1, fsdp=True), dict(model=dict(hidden_size=36)),
     r'hidden_size=36 must divide by mesh data=8'),
    (dict(data=-1, expert=1, plane=1, fsdp=True), dict(model=dict(kv_lora_rank=12)),
     r'kv_lora_rank=12 must divide by mesh data=8'),
])
def test_bad_layouts_name_the_sizes(mesh, change, message, corpus):
  config = small_config(corpus)
  config.mesh.update(mesh)
  for section, values in change.items():
    config[section].update(values)
  cfg = ModelConfig.from_dict(config.model.to_dict())
  with pytest.raises(ValueError, match=message):
    loop.mesh_from_config(config, cfg, config.train.batch_size)


# ---- several processes -------------------------------------------------------------------------

CONFIG_FILE = f'''
from experiments.configs import tiny

def get_config():
  config = tiny.get_config()
  config.model.update({MODEL!r})
  config.train.update({TRAIN!r})
  config.data.update(dict(path=CORPUS, tokenizer='byte', heldout_fraction=0.25))
  config.mesh.update(dict(data=2, expert=2, plane=2))
  return config
'''


def loss_rows(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {row['step']: row['loss'] for row in rows if 'loss' in row}


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(
    corpus, setup, sharded_runs, tmp_path):
  """`python -m experiments.run` as 2 processes x 4 CPU devices on the (2, 2, 2) mesh (so expert
  all-to-alls and gradient reductions cross processes) against one process of 8 devices on the
  same mesh and batches (`sharded_runs`, itself checked against one device)."""
  config_path = tmp_path / 'two_process.py'
  config_path.write_text(CONFIG_FILE.replace('CORPUS', repr(str(corpus))))
  workdir = tmp_path / 'two'
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', XLA_FLAGS=(
      '--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0'))
  address = f'127.0.0.1:{processes_lib.free_port()}'
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'experiments.run', f'--config={config_path}',
       f'--config.train.steps={STEPS}', f'--workdir={workdir}',
       f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    one = sharded_runs((2, 2, 2))  # meanwhile, if not done yet
  except BaseException:
    processes_lib.finish(processes, 0)  # stops them
    raise
  outputs = [out for out, _ in processes_lib.finish(processes, 240)]
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output
  assert '"step": 20' in outputs[0] and '"step"' not in outputs[1]  # only process 0 prints
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  two = {row['step']: row['loss'] for row in rows if 'loss' in row}
  assert sorted(two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], one['losses'][:STEPS], rtol=1e-4)

  # Their checkpoint in this one process, on the same mesh: 2 more steps as the 8-device run's.
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', read_only=True)
  assert checkpoints.latest_step() == STEPS
  target = sharding.with_shardings(setup.abstract, setup.shardings(one['mesh']))
  state, data_state = checkpoints.restore(STEPS, target, meta(setup))
  checkpoints.close()
  with jax.set_mesh(one['mesh']):
    for i in (STEPS, STEPS + 1):
      batch = sharding.put_batch(setup.batches[i], sharding.batch_sharding(one['mesh']))
      state, (metrics, _) = one['step'](state, batch)
      assert rel(metrics['loss'], one['losses'][i]) <= 1e-4, i
  # ... and the data iterator's state: where one process's iterator is after 20 batches.
  iterator = setup.iterator()
  for _ in range(STEPS):
    next(iterator)
  assert data_state == iterator.get_state()

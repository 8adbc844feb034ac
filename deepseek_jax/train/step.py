"""The pure train and eval steps: `step(state, batch) -> (state, metrics)` under plain `jax.jit`.

The train state is a dict of arrays: `tree` ({'params', 'router_bias'}, see optimizer.py), the
optimizer state `opt`, and the `step` counter. Gradients are taken w.r.t. the params only; the
router biases move by the aux-loss-free rule from the step's expert load, inside the optimizer.

Sharded runs (`deepseek_jax/sharding.py`): `initializer` gives the function that creates the
state, so that `jax.jit(init, out_shardings=...)` creates it in place on the mesh, and the steps
take the state's and the batch's shardings (metrics come back replicated, readable by every
process). Call the steps under `jax.set_mesh(mesh)`: the MoE layer picks its expert-parallel
path from the ambient mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.train import loss as loss_lib
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train.config import TrainConfig


def init_state(tree: dict, tx: optax.GradientTransformation) -> dict:
  return {'tree': tree, 'opt': tx.init(tree), 'step': jnp.zeros((), jnp.int32)}


def initializer(cfg: ModelConfig, seed: int,
                tx: optax.GradientTransformation) -> Callable[[], tuple[dict, nnx.State]]:
  """`init() -> (train state, rest)`: a fresh model's state (the same values as
  `model.create(cfg, seed)`) and its non-trainable rest. `jax.eval_shape(init)` gives the
  abstract state (with the Variables' logical axis names) the shardings are derived from;
  `jax.jit(init, out_shardings=...)()` creates it directly sharded."""

  def init():
    _, tree, rest = model_lib.split_trainable(model_lib.create(cfg, seed))
    return init_state(tree, tx), rest

  return init


def loss_and_grads(graphdef: nnx.GraphDef, rest: nnx.State, train: TrainConfig, tree: dict,
                   batch: dict,
                   step: jax.Array) -> tuple[tuple[jax.Array, tuple[dict, jax.Array]], nnx.State]:
  """((loss, (metrics, expert_load [L_moe, E])), grads of the params) for one batch
  {'inputs', 'targets'}: int [B, T]; pure, for jit."""
  mask = jnp.ones(batch['targets'].shape, jnp.float32)  # packed windows: every target is real

  def loss_fn(params):
    model = model_lib.merge_trainable(graphdef, {'params': params,
                                               'router_bias': tree['router_bias']}, rest)
    output = model(batch['inputs'], head=not train.loss_chunk)  # the loss applies the head
    loss, metrics = loss_lib.total_loss(output, batch['targets'], mask, step, train, model.logits)
    return loss, (metrics, output.expert_load)

  return jax.value_and_grad(loss_fn, has_aux=True)(tree['params'])


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, cfg: ModelConfig, train: TrainConfig,
                    tx: optax.GradientTransformationExtraArgs, state_shardings=None,
                    batch_sharding: NamedSharding | None = None):
  """A jitted `(state, batch) -> (state, (metrics, expert_load))`; the input state's buffers
  are donated. With shardings (`sharding.train_state_shardings`, `sharding.batch_sharding`) the
  new state keeps the state's shardings and the metrics are replicated."""
  schedule = opt_lib.learning_rate_schedule(train)

  def step(state, batch):
    tree = state['tree']
    (_, (metrics, expert_load)), grads = loss_and_grads(graphdef, rest, train, tree, batch,
                                                        state['step'])
    # The bias gets no gradient: a zero placeholder, ignored by its optimizer branch.
    grad_tree = {'params': grads, 'router_bias': jax.tree.map(jnp.zeros_like, tree['router_bias'])}
    loads = opt_lib.bias_loads(tree['router_bias'], expert_load, cfg)
    updates, opt_state = tx.update(grad_tree, state['opt'], tree, expert_load=loads)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   lr=jnp.asarray(schedule(state['step']), jnp.float32))
    new_state = {'tree': optax.apply_updates(tree, updates), 'opt': opt_state,
                 'step': state['step'] + 1}
    return new_state, (metrics, expert_load)

  if batch_sharding is None:
    return jax.jit(step, donate_argnums=0)
  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated))


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, tree_shardings=None,
                   batch_sharding: NamedSharding | None = None):
  """A jitted `(tree, batch, bytes_per_token) -> (sum of nats, tokens, bytes)` of the main head
  (replicated when given the shardings of the tree and the batch)."""

  def step(tree, batch, bytes_per_token):
    model = model_lib.merge_trainable(graphdef, tree, rest)
    logits = model(batch['inputs']).logits
    mask = jnp.ones(batch['targets'].shape, jnp.float32)
    nats, tokens = loss_lib.cross_entropy(logits, batch['targets'], mask)
    return nats, tokens, jnp.sum(bytes_per_token[batch['targets']])

  if batch_sharding is None:
    return jax.jit(step)
  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(tree_shardings, batch_sharding, replicated),
                 out_shardings=replicated)

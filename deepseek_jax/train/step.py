"""The pure train and eval steps: `step(state, batch) -> (state, metrics)` under plain `jax.jit`.

The train state is a dict of arrays: `tree` ({'params', 'router_bias'}, see optimizer.py), the
optimizer state `opt`, and the `step` counter. Gradients are taken w.r.t. the params only; the
router biases move by the aux-loss-free rule from the step's expert load, inside the optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.train import loss as loss_lib
from deepseek_jax.train import optimizer as opt_lib


def init_state(tree: dict, tx: optax.GradientTransformation) -> dict:
  return {'tree': tree, 'opt': tx.init(tree), 'step': jnp.zeros((), jnp.int32)}


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, cfg: ModelConfig, train,
                    tx: optax.GradientTransformationExtraArgs):
  """A jitted `(state, batch) -> (state, metrics)`; the input state's buffers are donated."""
  schedule = opt_lib.learning_rate_schedule(train)

  def step(state, batch):
    tree = state['tree']
    mask = jnp.ones(batch['targets'].shape, jnp.float32)  # packed windows: every target is real

    def loss_fn(params):
      model = opt_lib.merge_trainable(graphdef, {'params': params,
                                                 'router_bias': tree['router_bias']}, rest)
      output = model(batch['inputs'])
      loss, metrics = loss_lib.total_loss(output, batch['targets'], mask, state['step'], train)
      return loss, (metrics, output.expert_load)

    (_, (metrics, expert_load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        tree['params'])
    # The bias gets no gradient: a zero placeholder, ignored by its optimizer branch.
    grad_tree = {'params': grads, 'router_bias': jax.tree.map(jnp.zeros_like, tree['router_bias'])}
    loads = opt_lib.bias_loads(tree['router_bias'], expert_load, cfg)
    updates, opt_state = tx.update(grad_tree, state['opt'], tree, expert_load=loads)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   lr=jnp.asarray(schedule(state['step']), jnp.float32))
    new_state = {'tree': optax.apply_updates(tree, updates), 'opt': opt_state,
                 'step': state['step'] + 1}
    return new_state, (metrics, expert_load)

  return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State):
  """A jitted `(tree, batch, bytes_per_token) -> (sum of nats, tokens, bytes)` of the main head."""

  def step(tree, batch, bytes_per_token):
    model = opt_lib.merge_trainable(graphdef, tree, rest)
    logits = model(batch['inputs']).logits
    mask = jnp.ones(batch['targets'].shape, jnp.float32)
    nats, tokens = loss_lib.cross_entropy(logits, batch['targets'], mask)
    return nats, tokens, jnp.sum(bytes_per_token[batch['targets']])

  return jax.jit(step)

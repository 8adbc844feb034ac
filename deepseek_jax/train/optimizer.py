"""The optimizer: AdamW on the parameters, the aux-loss-free bias update on the router biases.

The trainable tree is `{'params': State[nnx.Param], 'router_bias': State[RouterBias]}`
(`model.split_trainable`). `optax.partition` routes its two subtrees:
- 'adamw': global-norm clipping, Adam (moments optionally in BF16, V3 §3.3), decoupled weight decay
  on matrices only, and the warm-up + cosine learning-rate schedule;
- 'bias': the aux-loss-free balancing of V3 §2.1.2, b_i -= gamma * sign(load_i - mean load), which
  reads the step's expert load from the extra argument `expert_load` and ignores its "gradient".
The router bias therefore has no Adam moments, no weight decay and no share of the clipping norm.

In a train step:
  loads = bias_loads(tree['router_bias'], out.expert_load, cfg)
  updates, opt_state = tx.update(grads, opt_state, tree, expert_load=loads)
  tree = optax.apply_updates(tree, updates)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.train.config import TrainConfig

LABELS = {'params': 'adamw', 'router_bias': 'bias'}  # a prefix of the trainable tree


def bias_loads(router_bias_state: nnx.State, expert_load: jax.Array, cfg: ModelConfig) -> nnx.State:
  """Each router bias's row of the model's `expert_load` [L_moe, E], in the bias state's structure.

  Rows are the MoE layers in order (main layer i >= first_k_dense is row i - first_k_dense),
  then MTP module k's block (row num_layers - first_k_dense + k). Under `scan_layers` the main
  layers' biases are one [L_moe - P, E] stack, which takes the main rows at once.
  """
  rows = cfg.num_moe_layers + cfg.mtp_depth
  if expert_load.shape != (rows, cfg.n_routed_experts):
    raise ValueError(f'expert_load has shape {expert_load.shape}; the model has {rows} MoE '
                     f'layers of {cfg.n_routed_experts} experts')

  def rows_of(path) -> jax.Array:
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if keys == ('moe_layers', 'ffn', 'router_bias'):
      return expert_load[:cfg.num_moe_layers]
    if keys[:1] == ('layers',) and keys[2:] == ('ffn', 'router_bias'):
      if keys[1] >= cfg.first_k_dense:  # a dense layer's row would silently index from the end
        return expert_load[keys[1] - cfg.first_k_dense]
    if keys[:1] == ('mtp',) and keys[2:] == ('block', 'ffn', 'router_bias'):
      return expert_load[cfg.num_moe_layers + keys[1]]
    raise ValueError(f'no expert-load row for the router bias at {keys}')

  return jax.tree_util.tree_map_with_path(lambda path, _: rows_of(path), router_bias_state)


def _key_names(path) -> tuple:
  """The dict keys and indices of a pytree path (a Variable's `.value` attribute dropped)."""
  return tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path
               if not isinstance(k, jax.tree_util.GetAttrKey))


# ---- the aux-loss-free bias update -----------------------------------------------------------

def switched_schedule(early: float, late: float, switch_step: int) -> optax.Schedule:
  """float32 `early` before step `switch_step`, `late` from it on; `early` throughout when
  switch_step < 0. The step may be traced. (V3's late changes of gamma and of lambda, §4.2.)"""
  if switch_step < 0:
    return lambda step: jnp.asarray(early, jnp.float32)
  return lambda step: jnp.where(jnp.asarray(step) < switch_step, jnp.float32(early),
                                jnp.float32(late))


def bias_gamma_schedule(train: TrainConfig) -> optax.Schedule:
  """gamma per update: `bias_gamma`, then `bias_gamma_late` from update `bias_gamma_switch_step`
  on (V3 §4.2 keeps 0.001 for 14.3T tokens and 0 for the last 500B, letting routing settle)."""
  return switched_schedule(train.bias_gamma, train.bias_gamma_late,
                           train.bias_gamma_switch_step)


def aux_free_bias_update(gamma: float | optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """V3 §2.1.2: each bias moves by -gamma * sign(load_i - mean load); the gradient is ignored.

  `gamma` is a number or a schedule of the update count (kept in the state, as optax does).

  `update(updates, state, params, expert_load=...)` takes the loads in the structure of the bias
  leaves (`bias_loads`). Inside `optax.partition` the updates are the whole trainable tree with
  the other subtrees masked out (leafless), so leaves are paired in order, and each load's path
  must end the path of the bias it moves (plain dicts of arrays work as well as nnx.State).
  """

  schedule = gamma if callable(gamma) else optax.constant_schedule(gamma)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, expert_load=None, **extra_args):
    del params, extra_args
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    if not flat:
      return updates, state
    step_gamma = schedule(state.count)
    state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
    if expert_load is None:
      raise ValueError('aux_free_bias_update needs the extra argument expert_load (bias_loads)')
    loads = jax.tree_util.tree_flatten_with_path(expert_load)[0]
    if len(loads) != len(flat):
      raise ValueError(f'{len(loads)} expert loads for {len(flat)} router biases')
    moves = []
    for (path, bias_update), (load_path, load) in zip(flat, loads):
      names, load_names = _key_names(path), _key_names(load_path)
      if names[len(names) - len(load_names):] != load_names or load.shape != bias_update.shape:
        raise ValueError(f'expert load {jax.tree_util.keystr(load_path)} {load.shape} does not '
                         f'match router bias {jax.tree_util.keystr(path)} {bias_update.shape}')
      load = load.astype(jnp.float32)
      # Overloaded experts (above the layer's mean) lose gamma, underloaded gain it, balanced
      # stay put; a stack of layers' biases ([L, E], `scan_layers`) moves row by row.
      move = step_gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
      moves.append(move.astype(bias_update.dtype))
    return treedef.unflatten(moves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---- AdamW -----------------------------------------------------------------------------------

def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
  """Linear warm-up from 0 to learning_rate, then cosine down to learning_rate * min_lr_ratio
  at step `steps` (constant after). Indexed by the optimizer's update count, starting at 0.
  (TrainConfig checks 0 <= warmup_steps < steps.)"""
  peak, end = train.learning_rate, train.learning_rate * train.min_lr_ratio
  if train.warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, train.steps, alpha=train.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(0.0, peak, train.warmup_steps, train.steps, end)


def _decayed(path, leaf) -> bool:
  """Weight decay for matrices only: not norms, not 1-D parameters (the bias is routed away)."""
  names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  return leaf.ndim >= 2 and not any(name.endswith('norm') for name in names)


def decay_mask(tree):
  return jax.tree_util.tree_map_with_path(_decayed, tree)


def _scale_by_adam(b1: float, b2: float, eps: float, bf16: bool) -> optax.GradientTransformation:
  """Adam; with `bf16`, both moments are stored in bfloat16 (V3 §3.3).

  optax only offers `mu_dtype`; it keeps nu in the dtype of its initial state (`cast_like`), so
  starting nu in bfloat16 keeps it there. The moment arithmetic itself runs in float32. BF16 nu
  needs b2 far enough below 1 (V3: 0.95) that (1 - b2) g^2 is not lost to its 8-bit mantissa.
  """
  adam = optax.scale_by_adam(b1, b2, eps, mu_dtype=jnp.bfloat16 if bf16 else None)
  if not bf16:
    return adam

  def init_fn(params):
    state = adam.init(params)
    return state._replace(nu=optax.tree.cast(state.nu, jnp.bfloat16))

  return optax.GradientTransformation(init_fn, adam.update)


def adamw(train: TrainConfig) -> optax.GradientTransformationExtraArgs:
  """optax.adamw with global-norm clipping first and the BF16-moment option (an unresolved
  `bf16_moments=None` is FP32 here: `train.config.resolve` gives it its precision rule)."""
  parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
  parts += [
      _scale_by_adam(train.b1, train.b2, train.eps, bool(train.bf16_moments)),
      optax.add_decayed_weights(train.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(learning_rate_schedule(train)),
  ]
  return optax.chain(*parts)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformationExtraArgs:
  """AdamW on tree['params'], the aux-loss-free update on tree['router_bias'].

  `optax.partition` hands every extra argument to both branches: AdamW ignores `expert_load`, the
  bias branch reads it (it must not be masked, hence mask_compatible_extra_args=False).
  """
  return optax.partition(
      {'adamw': adamw(train), 'bias': aux_free_bias_update(bias_gamma_schedule(train))}, LABELS,
      mask_compatible_extra_args=False)

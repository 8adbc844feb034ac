"""The optimizer: the aux-loss-free bias update (V3 §2.1.2) moves each bias by exactly -gamma,
+gamma or 0 and touches nothing else; AdamW's weight-decay mask, schedule, clipping and BF16
moments; the split/merge of the trainable tree and the expert-load rows of each router bias."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from tests.tiny import tiny_config
from deepseek_jax.layers.param import RouterBias
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train.config import TrainConfig

E = 4
# One module per layer, so that each MoE layer's bias has its own path; the stacked layout's
# [L, E] biases are tested at the end.
CFG = tiny_config(n_routed_experts=E, n_group=2, topk_group=1, init_std=0.02, scan_layers=False)
GAMMA = 1e-3
BIAS_PATHS = [('layers', 1, 'ffn', 'router_bias'), ('layers', 2, 'ffn', 'router_bias'),
              ('mtp', 0, 'block', 'ffn', 'router_bias')]


def train_cfg(**changes) -> TrainConfig:
  return TrainConfig(**{**dict(learning_rate=1e-2, steps=100, warmup_steps=0, bias_gamma=GAMMA),
                        **changes})


@pytest.fixture(scope='module')
def split():
  """(graphdef, tree, rest) of the tiny model: shapes from `abstract` (no init cost), random
  values."""
  graphdef, tree, rest = model_lib.split_trainable(model_lib.abstract(CFG))
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(0)
  values = [jnp.asarray(rng.standard_normal(s.shape), s.dtype) for s in leaves]
  return graphdef, jax.tree.unflatten(treedef, values), rest


def flat(state) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


# Loads per MoE row [M = 3, E]: over, under, balanced experts; row 2 all at the mean.
LOADS = np.array([[3, 1, 2, 2],     # mean 2: -g, +g, 0, 0
                  [0, 5, 2, 1],     # mean 2: +g, -g, 0, +g
                  [4, 4, 4, 4]])    # balanced: no move
MOVES = np.float32(GAMMA) * np.array([[-1, 1, 0, 0], [1, -1, 0, 1], [0, 0, 0, 0]], np.float32)


# ---- the trainable tree ----------------------------------------------------------------------

def test_split_merge_round_trip(split):
  graphdef, tree, rest = split
  assert set(tree) == {'params', 'router_bias'}
  assert [p for p, _ in nnx.to_flat_state(tree['router_bias'])] == BIAS_PATHS
  assert all(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(tree['router_bias']))
  assert all(type(v) is nnx.Param for _, v in nnx.to_flat_state(tree['params']))
  # embed, head, norm + dense block 15 + MoE blocks 2 x 19 + MTP (block 19, eh_proj, 3 norms)
  assert len(nnx.to_flat_state(tree['params'])) == 3 + 15 + 2 * 19 + 23
  assert not jax.tree.leaves(rest)
  model = model_lib.merge_trainable(graphdef, tree, rest)
  np.testing.assert_array_equal(model.mtp[0].block.ffn.router_bias[...],
                                tree['router_bias']['mtp'][0]['block']['ffn']['router_bias'][...])
  np.testing.assert_array_equal(model.layers[2].attn.w_o[...],
                                tree['params']['layers'][2]['attn']['w_o'][...])
  graphdef2, tree2, _ = model_lib.split_trainable(model)
  assert graphdef2 == graphdef
  for part in ('params', 'router_bias'):
    a, b = flat(tree[part]), flat(tree2[part])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bias_loads_rows(split):
  _, tree, _ = split
  loads = flat(opt.bias_loads(tree['router_bias'], jnp.asarray(LOADS), CFG))
  # first_k_dense = 1: layer 1 -> row 0, layer 2 -> row 1, MTP module 0 -> row 3 - 1 + 0 = 2
  assert list(loads) == BIAS_PATHS
  for row, path in enumerate(BIAS_PATHS):
    np.testing.assert_array_equal(loads[path], LOADS[row])
  with pytest.raises(ValueError, match='expert_load has shape'):
    opt.bias_loads(tree['router_bias'], jnp.zeros((2, E), jnp.int32), CFG)


def test_stacked_biases_take_their_rows_and_move_row_by_row():
  """Under scan_layers the main MoE layers' biases are one [2, E] stack: it takes rows 0 and 1
  at once and each row moves against its own layer's mean, as the unrolled biases do."""
  cfg = CFG.replace(scan_layers=True)
  _, tree, _ = model_lib.split_trainable(model_lib.abstract(cfg))
  bias = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree['router_bias'])
  loads = opt.bias_loads(bias, jnp.asarray(LOADS), cfg)
  stack, mtp = ('moe_layers', 'ffn', 'router_bias'), ('mtp', 0, 'block', 'ffn', 'router_bias')
  got = flat(loads)
  assert list(got) == [stack, mtp]
  np.testing.assert_array_equal(got[stack], LOADS[:2])
  np.testing.assert_array_equal(got[mtp], LOADS[2])
  tx = opt.aux_free_bias_update(GAMMA)
  updates = flat(tx.update(bias, tx.init(bias), bias, expert_load=loads)[0])
  np.testing.assert_array_equal(updates[stack], MOVES[:2])
  np.testing.assert_array_equal(updates[mtp], MOVES[2])


# ---- the aux-loss-free bias update -----------------------------------------------------------

def test_bias_update_moves_by_exactly_gamma(split):
  _, tree, _ = split
  bias = tree['router_bias']
  tx = opt.aux_free_bias_update(GAMMA)
  huge = jax.tree.map(lambda b: jnp.full_like(b, 1e6), bias)  # the "gradient" is ignored
  updates, state = tx.update(huge, tx.init(bias), bias,
                             expert_load=opt.bias_loads(bias, jnp.asarray(LOADS), CFG))
  assert int(state.count) == 1  # a step counter for the gamma schedule, nothing per expert
  got = flat(updates)
  for row, path in enumerate(BIAS_PATHS):
    np.testing.assert_array_equal(got[path], MOVES[row])
  with pytest.raises(ValueError, match='expert_load'):
    tx.update(huge, state, bias)


def test_bias_update_zero_for_an_expert_exactly_at_the_mean():
  tx = opt.aux_free_bias_update(0.5)
  bias = {'b': jnp.zeros(5)}
  load = {'b': jnp.array([7, 3, 5, 5, 5])}  # mean exactly 5
  updates, _ = tx.update(bias, tx.init(bias), expert_load=load)
  np.testing.assert_array_equal(updates['b'], [-0.5, 0.5, 0.0, 0.0, 0.0])


@functools.partial(jax.jit, static_argnums=0)
def _step(tx, grads, state, tree, loads):
  updates, state = tx.update(grads, state, tree, expert_load=loads)
  return optax.apply_updates(tree, updates), state


def test_full_optimizer_moves_bias_only(split):
  """Zero parameter gradients, no decay: params stay bit-identical while each bias moves by
  exactly +-gamma per step, despite a 1e6 bias "gradient"; the bias has no Adam moments."""
  _, tree, _ = split
  tx = opt.make_optimizer(train_cfg(weight_decay=0.0))
  grads = {'params': zeros_like(tree['params']),
           'router_bias': jax.tree.map(lambda b: jnp.full_like(b, 1e6), tree['router_bias'])}
  loads = opt.bias_loads(tree['router_bias'], jnp.asarray(LOADS), CFG)
  state = tx.init(tree)
  new = tree
  for _ in range(2):
    new, state = _step(tx, grads, state, new, loads)
  before, after = flat(tree['params']), flat(new['params'])
  assert all(np.array_equal(before[k], after[k]) for k in before)
  before, after = flat(tree['router_bias']), flat(new['router_bias'])
  for row, path in enumerate(BIAS_PATHS):
    np.testing.assert_allclose(after[path] - before[path], 2 * MOVES[row], atol=1e-6)
  adam = state.inner_states['adamw'].inner_state[1]
  assert isinstance(adam, optax.ScaleByAdamState) and int(adam.count) == 2
  assert adam.mu['router_bias'] == optax.MaskedNode()
  assert adam.nu['router_bias'] == optax.MaskedNode()
  bias_state = state.inner_states['bias'].inner_state
  assert isinstance(bias_state, optax.ScaleByScheduleState) and int(bias_state.count) == 2


def test_bias_gamma_switches_to_the_late_value_at_the_switch_step():
  """gamma = bias_gamma for updates 0..2, bias_gamma_late from update 3 on: the moves of five
  updates at a fixed load are exactly g, g, g, g_late, g_late (V3 §4.2's late gamma of 0)."""
  tx = opt.make_optimizer(train_cfg(bias_gamma=0.25, bias_gamma_late=0.0625,
                                    bias_gamma_switch_step=3))
  tree = {'params': {'w': jnp.ones((2, 2))}, 'router_bias': {'b': jnp.zeros(3)}}
  grads = jax.tree.map(jnp.zeros_like, tree)
  load = {'b': jnp.array([1, 2, 3])}  # mean 2: +g, 0, -g
  state, moves = tx.init(tree), []
  for _ in range(5):
    new, state = _step(tx, grads, state, tree, load)
    move = np.asarray(new['router_bias']['b'] - tree['router_bias']['b'])
    np.testing.assert_array_equal(move, [move[0], 0.0, -move[0]])
    moves.append(float(move[0]))
    tree = new
  assert moves == [0.25, 0.25, 0.25, 0.0625, 0.0625]
  constant = opt.bias_gamma_schedule(train_cfg(bias_gamma=0.5, bias_gamma_late=0.0))
  assert [float(constant(n)) for n in (0, 10**6)] == [0.5, 0.5]


# ---- AdamW -----------------------------------------------------------------------------------

def test_weight_decay_mask_and_exact_decay(split):
  _, tree, _ = split
  mask = flat(opt.decay_mask(tree['params']))
  undecayed = sorted(p for p, m in mask.items() if not m)
  assert all(p[-1] == 'weight' and p[-2].endswith('norm') for p in undecayed)
  # attn/ffn/q/kv norms in 3 main blocks and the MTP block, MTP enorm/hnorm/norm, final norm
  assert len(undecayed) == 4 * 4 + 3 + 1
  assert all(mask[p] == (np.ndim(v) >= 2) for p, v in flat(tree['params']).items())
  # lr = 1e-2 with warm-up 2: the first three updates use lr 0, 5e-3, 1e-2.
  train = train_cfg(weight_decay=0.1, warmup_steps=2)
  tx = opt.make_optimizer(train)
  balanced = opt.bias_loads(tree['router_bias'], jnp.full((3, E), 4, jnp.int32), CFG)
  grads = zeros_like(tree)
  state, new = tx.init(tree), tree
  for _ in range(3):
    new, state = _step(tx, grads, state, new, balanced)
  shrink = (1 - 0.0 * 0.1) * (1 - 5e-3 * 0.1) * (1 - 1e-2 * 0.1)
  before, after = flat(tree['params']), flat(new['params'])
  for path in before:
    if mask[path]:
      np.testing.assert_allclose(after[path], before[path] * shrink, rtol=1e-6, err_msg=str(path))
    else:
      np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
  bias_before, bias_after = flat(tree['router_bias']), flat(new['router_bias'])
  assert all(np.array_equal(bias_before[k], bias_after[k]) for k in bias_before)


def test_decay_mask_rules_separately():
  """In the model every 1-D parameter is a norm; here each rule is seen alone."""
  params = nnx.State({'w': nnx.Param(jnp.ones((2, 3))), 'scale': nnx.Param(jnp.ones(3)),
                      'q_norm': {'weight': nnx.Param(jnp.ones((2, 2)))},
                      'experts': nnx.Param(jnp.ones((2, 2, 2)))})
  mask = {p: v.get_value() for p, v in nnx.to_flat_state(opt.decay_mask(params))}
  assert mask == {('w',): True, ('scale',): False, ('q_norm', 'weight'): False,
                  ('experts',): True}


def test_schedule_values():
  sched = opt.learning_rate_schedule(train_cfg(learning_rate=1e-3, warmup_steps=10, steps=110,
                                               min_lr_ratio=0.1))
  # warm-up 0 -> 1e-3 over 10 steps; cosine from 1e-3 to 1e-4 over steps 10..110
  expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 1e-4 + 0.5 * 9e-4,
              35: 1e-4 + 9e-4 * 0.5 * (1 + np.cos(np.pi / 4)), 110: 1e-4, 500: 1e-4}
  for step, want in expected.items():
    np.testing.assert_allclose(sched(step), want, rtol=1e-6, atol=1e-12, err_msg=str(step))
  no_warmup = opt.learning_rate_schedule(train_cfg(learning_rate=2.0, warmup_steps=0, steps=10,
                                                   min_lr_ratio=0.5))
  np.testing.assert_allclose([no_warmup(0), no_warmup(5), no_warmup(10)], [2.0, 1.5, 1.0],
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r'TrainConfig\.warmup_steps=100: must lie in \[0, '):
    train_cfg(warmup_steps=100, steps=100)


def _small_tree():
  params = nnx.State({'w': nnx.Param(jnp.zeros((2, 2))),
                      'norm': {'weight': nnx.Param(jnp.ones(3))}})
  return {'params': params, 'router_bias': nnx.State({'b': RouterBias(jnp.zeros(2))})}


@pytest.mark.parametrize('scale', [10.0, 0.5])
def test_global_norm_clipping_over_params_only(scale):
  """Adam's first moment after one step is (1 - b1) * clipped gradient: a gradient of global norm
  10 is scaled to norm 1 (grad_clip), one of norm 0.5 is left alone. The 1e6 bias "gradient"
  is not part of that norm."""
  tree = _small_tree()
  grads = {'params': nnx.State({'w': nnx.Param(scale * jnp.array([[0.6, 0.0], [0.0, 0.0]])),
                                'norm': {'weight': nnx.Param(scale * jnp.array([0.0, 0.8, 0.0]))}}),
           'router_bias': nnx.State({'b': RouterBias(jnp.full(2, 1e6))})}
  tx = opt.make_optimizer(train_cfg(grad_clip=1.0, b1=0.9))
  _, state = tx.update(grads, tx.init(tree), tree, expert_load={'b': jnp.array([1, 1])})
  mu = state.inner_states['adamw'].inner_state[1].mu['params']
  clipped = min(scale, 1.0)
  np.testing.assert_allclose(mu['w'][...], 0.1 * clipped * np.array([[0.6, 0], [0, 0]]), rtol=1e-6)
  np.testing.assert_allclose(mu['norm']['weight'][...], 0.1 * clipped * np.array([0, 0.8, 0]),
                             rtol=1e-6)


@pytest.mark.parametrize('bf16', [True, False])
def test_moment_dtypes(bf16):
  tree = _small_tree()
  tx = opt.make_optimizer(train_cfg(bf16_moments=bf16))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), tree)
  state = tx.init(tree)
  _, state = _step(tx, grads, state, tree, {'b': jnp.array([1, 1])})
  want = jnp.dtype(jnp.bfloat16 if bf16 else jnp.float32)
  adam = state.inner_states['adamw'].inner_state[1]
  for moment in (adam.mu, adam.nu):
    assert {x.dtype for x in jax.tree.leaves(moment)} == {want}
  # nu after one step = (1 - b2) g^2 = 0.05 * 0.09, to bf16's 8-bit precision
  np.testing.assert_allclose(np.asarray(adam.nu['params']['w'][...], np.float32), 0.0045,
                             rtol=2 ** -8 if bf16 else 1e-6)

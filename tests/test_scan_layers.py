"""Scanned layers (`model.scan_layers`, deepseek_jax/DESIGN.md "Scanned layers"): the stacked
model is the unrolled one. Same initial values, same logits and gradients (float32, 1e-5
relative), the same losses over 10 optimizer steps, and layer views and layout conversions that
round-trip exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import TrainConfig
from tests.tiny import random_model, tiny_config

# 4 layers: a dense stack of 2 and an MoE stack of 2, and an MTP module (not stacked).
CFG = tiny_config(num_layers=4, first_k_dense=2, scan_layers=False)
SCANNED = CFG.replace(scan_layers=True)
TOKENS = jax.random.randint(jax.random.key(0), (2, 24), 0, CFG.vocab_size)


def flat_values(model_or_state) -> dict:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def relative(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
               / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def test_create_gives_both_layouts_the_same_values():
  unrolled = model_lib.create(CFG, seed=3)
  scanned = model_lib.create(SCANNED, seed=3)
  assert scanned.moe_layers.ffn.w_gate.shape == (2,) + unrolled.layers[2].ffn.w_gate.shape
  assert scanned.moe_layers.ffn.w_gate.get_metadata()['out_sharding'][0] == 'layers'
  stacked, expected = flat_values(model_lib.stack_layers(unrolled)), flat_values(scanned)
  assert stacked.keys() == expected.keys()
  for path in expected:
    np.testing.assert_array_equal(stacked[path], expected[path], err_msg=str(path))


def test_layout_conversions_round_trip_and_block_views_are_slices():
  unrolled = random_model(CFG, seed=1)
  scanned = model_lib.stack_layers(unrolled)
  assert model_lib.stack_layers(scanned) is scanned
  back = flat_values(model_lib.unstack_layers(scanned))
  for path, value in flat_values(unrolled).items():
    np.testing.assert_array_equal(back[path], value, err_msg=str(path))
  for i in range(CFG.num_layers):
    view, layer = flat_values(scanned.block(i)), flat_values(unrolled.layers[i])
    assert view.keys() == layer.keys()
    assert all(np.array_equal(view[k], layer[k]) for k in layer), i
  with pytest.raises(IndexError, match='layer 4: the model has 4 decoder layers'):
    scanned.block(4)


def _loss(graphdef):
  def loss(state, tokens):
    out = model_lib.apply(graphdef, state, tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return nll + 1e-2 * jnp.mean(out.mtp_logits ** 2) + jnp.sum(out.seq_balance_loss), out
  return loss


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_equals_unrolled_outputs_and_gradients(remat):
  unrolled = random_model(CFG.replace(remat=remat), seed=2)
  results = {}
  for name, model in (('unrolled', unrolled), ('scanned', model_lib.stack_layers(unrolled))):
    graphdef, state = nnx.split(model)
    results[name] = jax.jit(jax.value_and_grad(_loss(graphdef), has_aux=True))(state, TOKENS)
  (loss_u, out_u), grads_u = results['unrolled']
  (loss_s, out_s), grads_s = results['scanned']
  assert relative(loss_s, loss_u) <= 1e-5
  for field in ('logits', 'mtp_logits', 'hidden', 'seq_balance_loss'):
    assert relative(getattr(out_s, field), getattr(out_u, field)) <= 1e-5, field
  np.testing.assert_array_equal(out_s.expert_load, out_u.expert_load)  # [3, E]: 2 main, 1 MTP
  np.testing.assert_array_equal(out_s.expert_ids, out_u.expert_ids)
  stacked = model_lib.relayout(flat_values(grads_u), CFG)  # the unrolled grads, stacked
  got = flat_values(grads_s)
  assert stacked.keys() == got.keys()
  for path, g in got.items():
    assert relative(g, stacked[path]) <= 1e-5, path


def test_ten_training_steps_give_the_same_losses():
  """The real train step (AdamW, the aux-free bias update on stacked [L, E] biases, MTP and
  balance losses) from `initializer`'s state in both layouts."""
  train = TrainConfig(steps=10, warmup_steps=1, learning_rate=1e-2, batch_size=4, seq_len=16,
                      bias_gamma=1e-2)
  tx = opt_lib.make_optimizer(train)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, CFG.vocab_size, (4, 17)) for _ in range(10)]
  losses, biases = {}, {}
  for cfg in (CFG, SCANNED):
    state, rest = step_lib.initializer(cfg, 0, tx)()
    graphdef = nnx.graphdef(model_lib.abstract(cfg))
    train_step = step_lib.make_train_step(graphdef, rest, cfg, train, tx)
    losses[cfg.scan_layers] = []
    for tokens in batches:
      batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:])}
      state, (metrics, _) = train_step(state, batch)
      losses[cfg.scan_layers].append(float(metrics['loss']))
    biases[cfg.scan_layers] = flat_values(state['tree']['router_bias'])
  print('losses unrolled', losses[False], 'scanned', losses[True])
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  # The biases moved (gamma 0.01 per step) and identically in both layouts.
  stacked = model_lib.relayout(biases[False], CFG)
  for path, value in biases[True].items():
    assert np.max(np.abs(value)) > 0.0, path
    np.testing.assert_allclose(value, stacked[path], atol=1e-6, err_msg=str(path))

"""The training loss against float64 numpy: cross-entropy, MTP shifting and masking (against a
per-position loop), the lambda schedule, the alpha balance term (eqs. 17-20, 25) and MaxVio."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import ModelOutput
from deepseek_jax.train import loss as loss_lib
from deepseek_jax.train.config import TrainConfig

B, T, V, D = 2, 6, 5, 3


def train_cfg(**changes) -> TrainConfig:
  return TrainConfig(**changes)


def output(logits, mtp_logits, expert_load=None, seq_balance_loss=None) -> ModelOutput:
  return ModelOutput(
      logits=jnp.asarray(logits, jnp.float32),
      mtp_logits=jnp.asarray(mtp_logits, jnp.float32),
      hidden=jnp.zeros(logits.shape[:2] + (D,), jnp.float32),
      expert_load=jnp.asarray(np.zeros((0, 4)) if expert_load is None else expert_load, jnp.int32),
      seq_balance_loss=jnp.asarray(np.zeros(0) if seq_balance_loss is None else seq_balance_loss,
                                   jnp.float32))


def nll_ref(logits_row, target):
  """-log softmax(logits_row)[target] in float64."""
  z = logits_row.astype(np.float64)
  return np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[target]


def sample(seed=0, P=2):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)) * 3
  mtp_logits = rng.normal(size=(P, B, T, V)) * 3
  targets = rng.integers(0, V, size=(B, T))
  mask = np.ones((B, T), bool)
  mask[0, 4], mask[1, 1] = False, False   # interior holes
  mask[1, 5] = False
  targets[~mask] = -1                      # padding ids must not matter where masked
  return logits, mtp_logits, targets, mask


def test_cross_entropy_uniform_logits_is_log_vocab():
  logits = jnp.zeros((1, 3, V))
  total, count = loss_lib.cross_entropy(logits, jnp.array([[0, 2, 4]]), jnp.ones((1, 3)))
  np.testing.assert_allclose(total, 3 * np.log(V), rtol=1e-6)
  assert float(count) == 3.0


def test_cross_entropy_matches_float64_and_is_stable():
  logits, _, targets, mask = sample()
  logits = logits + 1e4  # a naive exp overflows float32 here
  total, count = loss_lib.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                        jnp.asarray(mask))
  want = sum(nll_ref(logits[b, t], targets[b, t]) for b in range(B) for t in range(T) if mask[b, t])
  assert float(count) == 9.0
  assert np.isfinite(float(total))
  # 1e4 in float32 has a spacing of ~1e-3, which bounds how well any float32 input can agree.
  np.testing.assert_allclose(total, want, atol=9 * 2e-3)
  total0, _ = loss_lib.cross_entropy(jnp.asarray(logits - 1e4, jnp.float32),
                                     jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(total0, want, rtol=1e-5)


def test_mtp_shift_and_mask_against_a_loop():
  logits, mtp_logits, targets, mask = sample(P=2)
  train = train_cfg(bal_alpha=0.0, mtp_weight=0.3)
  loss, metrics = loss_lib.total_loss(output(logits, mtp_logits), jnp.asarray(targets),
                                      jnp.asarray(mask), 0, train)
  main = [nll_ref(logits[b, i], targets[b, i]) for b in range(B) for i in range(T) if mask[b, i]]
  depth_means = []
  for k in (1, 2):
    terms = [nll_ref(mtp_logits[k - 1, b, i], targets[b, i + k])
             for b in range(B) for i in range(T) if i + k < T and mask[b, i + k]]
    # k = 1: i in 0..4, minus targets (0,4),(1,1),(1,5): 7; k = 2: i in 0..3, minus (0,4),(1,5): 6.
    assert len(terms) == {1: 7, 2: 6}[k]
    depth_means.append(np.mean(terms))
  np.testing.assert_allclose(metrics['ce_loss'], np.mean(main), rtol=1e-5)
  np.testing.assert_allclose(metrics['mtp_loss'], np.mean(depth_means), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(main) + 0.3 * np.mean(depth_means), rtol=1e-5)
  assert float(metrics['tokens']) == 9.0
  assert float(metrics['bal_loss']) == 0.0 and float(metrics['max_vio']) == 0.0


def test_mtp_depth_k_ignores_its_last_k_positions():
  """Changing the depth-k logits at positions i >= T-k, or where target i+k is masked, changes
  nothing; changing them elsewhere does."""
  logits, mtp_logits, targets, mask = sample(P=2)
  train = train_cfg()
  base = loss_lib.total_loss(output(logits, mtp_logits), targets, mask, 0, train)[0]
  for k, i, b, counted in ((1, 5, 0, False), (2, 4, 0, False), (2, 5, 1, False),
                           (1, 3, 0, False),   # target of (k=1, i=3) is position 4: masked
                           (1, 0, 1, False),   # target position 1 of row 1: masked
                           (2, 3, 0, True)):
    bumped = mtp_logits.copy()
    bumped[k - 1, b, i] += np.arange(V) * 5.0
    new = loss_lib.total_loss(output(logits, bumped), targets, mask, 0, train)[0]
    assert (float(new) != float(base)) == counted, (k, i, b)


def test_mtp_weight_schedule():
  constant = train_cfg(mtp_weight=0.3, mtp_weight_late=0.1, mtp_weight_switch_step=-1)
  switched = train_cfg(mtp_weight=0.3, mtp_weight_late=0.1, mtp_weight_switch_step=100)
  assert float(loss_lib.mtp_weight(10**6, constant)) == np.float32(0.3)
  weight = jax.jit(lambda step: loss_lib.mtp_weight(step, switched))
  got = [float(weight(jnp.int32(s))) for s in (0, 99, 100, 5000)]
  assert got == [np.float32(0.3), np.float32(0.3), np.float32(0.1), np.float32(0.1)]
  # the schedule reaches the loss: lambda * mtp_loss at a traced step
  logits, mtp_logits, targets, mask = sample(P=1)
  step_loss = jax.jit(lambda step: loss_lib.total_loss(output(logits, mtp_logits), targets, mask,
                                                       step, switched))
  (early, m), (late, _) = step_loss(jnp.int32(99)), step_loss(jnp.int32(100))
  np.testing.assert_allclose(early - late, (0.3 - 0.1) * m['mtp_loss'], rtol=1e-5)


def test_balance_term_and_max_vio():
  logits, mtp_logits, targets, mask = sample(P=1)
  loads = np.array([[2, 2, 2, 2], [4, 0, 2, 2]])
  out = output(logits, mtp_logits, expert_load=loads, seq_balance_loss=[1.25, 0.75])
  train = train_cfg(bal_alpha=0.5, mtp_weight=0.3)
  loss, m = loss_lib.total_loss(out, targets, mask, 0, train)
  assert float(m['bal_loss']) == 1.0                      # mean of 1.25 and 0.75, without alpha
  np.testing.assert_allclose(loss, m['ce_loss'] + 0.3 * m['mtp_loss'] + 0.5 * 1.0, rtol=1e-6)
  # MaxVio per layer: 2/2 - 1 = 0 and 4/2 - 1 = 1; mean over the two layers 0.5
  assert float(m['max_vio']) == 0.5
  assert float(loss_lib.max_violation(jnp.array([[0, 6, 0]]))) == 2.0   # 6 / 2 - 1
  assert set(m) == {'loss', 'ce_loss', 'mtp_loss', 'bal_loss', 'max_vio', 'tokens'}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in m.values())


def test_no_moe_and_no_mtp_leave_cross_entropy_alone():
  logits, _, targets, mask = sample()
  out = output(logits, np.zeros((0, B, T, V)))
  loss, m = loss_lib.total_loss(out, targets, mask, 0, train_cfg(bal_alpha=1.0, mtp_weight=1.0))
  assert float(m['mtp_loss']) == 0.0 and float(m['bal_loss']) == 0.0
  assert float(m['max_vio']) == 0.0
  assert float(loss) == float(m['ce_loss'])


def test_chunked_head_and_cross_entropy_equal_the_whole_logits():
  """train.loss_chunk: the head applied 5 positions at a time (T = 16 is not a multiple) gives
  the loss, metrics and gradients of the full [B, T, V] logits (float32, 1e-6 relative)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from deepseek_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from deepseek_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from tests import tiny  # pylint: disable=import-outside-toplevel
  cfg = tiny.tiny_config(mtp_depth=2)
  graphdef, tree, rest = model_lib.split_trainable(tiny.random_model(cfg))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
  batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:])}
  results = []
  for chunk in (0, 5):
    train = TrainConfig(steps=10, warmup_steps=1, loss_chunk=chunk)
    results.append(jax.jit(lambda tree, batch, train=train: step_lib.loss_and_grads(
        graphdef, rest, train, tree, batch, 0))(tree, batch))
  ((loss, (metrics, _)), grads), ((chunked, (chunked_metrics, _)), chunked_grads) = results
  np.testing.assert_allclose(chunked, loss, rtol=1e-6)
  for name in ('ce_loss', 'mtp_loss', 'tokens'):
    np.testing.assert_allclose(chunked_metrics[name], metrics[name], rtol=1e-6)
  for (path, g), (_, c) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(chunked_grads)):
    g, c = np.asarray(g.get_value()), np.asarray(c.get_value())
    assert np.linalg.norm(c - g) <= 1e-6 * max(np.linalg.norm(g), 1e-30), path

"""Sampling against numpy references: greedy is argmax, temperature / top-k / top-p give the
distribution HF's order of warpers gives, draws follow it and are reproducible from the seed;
the speculative-sampling rule returns tokens distributed exactly as the target p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference import sampling, speculative


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """float64 numpy: softmax(logits / T), top-k, renormalise, top-p, renormalise (one row)."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind='stable')
  keep = np.zeros_like(z, bool)
  keep[order[:top_k or len(z)]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1:
    sorted_p = p[order]
    before = np.cumsum(sorted_p) - sorted_p
    kept = order[before < top_p]
    p = np.where(np.isin(np.arange(len(z)), kept), p, 0.0)
    p /= p.sum()
  return p


LOGITS = np.array([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 2.5, 1.5],
                   [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]], np.float32)


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.0, 0, 0.6), (1.3, 5, 0.8), (1.0, 1, 1.0),
                                                     (1.0, 0, 1e-6)])
def test_probabilities_match_numpy(temperature, top_k, top_p):
  probs = np.asarray(sampling.probabilities(jnp.asarray(LOGITS),
                                            sampling.Sampling(temperature, top_k, top_p)))
  for row, logits in zip(probs, LOGITS):
    np.testing.assert_allclose(row, reference(logits, temperature, top_k, top_p), atol=1e-6)
  if top_k:
    assert ((probs > 0).sum(axis=-1) <= top_k).all()


def test_greedy_is_argmax_and_top_k_1_is_greedy():
  key = jax.random.key(0)
  greedy = sampling.sample(jnp.asarray(LOGITS), key, sampling.Sampling())
  assert greedy.tolist() == [3, 7]
  for seed in range(5):
    drawn = sampling.sample(jnp.asarray(LOGITS), jax.random.key(seed), sampling.Sampling(2.0, 1))
    assert drawn.tolist() == [3, 7]


def test_draws_follow_the_distribution_and_the_seed():
  config = sampling.Sampling(0.9, 6, 0.95)
  rows = jnp.asarray(np.repeat(LOGITS[:1], 40_000, axis=0))
  draws = np.asarray(sampling.sample(rows, jax.random.key(1), config))
  frequencies = np.bincount(draws, minlength=LOGITS.shape[1]) / len(draws)
  expected = reference(LOGITS[0], 0.9, 6, 0.95)
  assert np.abs(frequencies - expected).max() < 0.01  # ~4 sigma at 40k draws
  assert frequencies[expected == 0].sum() == 0  # filtered tokens are never drawn
  again = np.asarray(sampling.sample(rows, jax.random.key(1), config))
  other = np.asarray(sampling.sample(rows, jax.random.key(2), config))
  assert np.array_equal(draws, again) and not np.array_equal(draws, other)


def test_speculative_rule_leaves_the_target_distribution():
  p = np.array([0.5, 0.2, 0.2, 0.1, 0.0], np.float32)  # target (main model)
  q = np.array([0.1, 0.5, 0.0, 0.2, 0.2], np.float32)  # draft (MTP), disagrees on purpose
  n = 200_000
  draft_key, rule_key = jax.random.split(jax.random.key(0))
  drafts = jax.random.categorical(draft_key, jnp.log(jnp.asarray(q)), shape=(n,))
  tokens, accepted = jax.jit(speculative.accept_or_resample)(
      jnp.broadcast_to(jnp.asarray(p), (n, 5)), jnp.broadcast_to(jnp.asarray(q), (n, 5)),
      drafts.astype(jnp.int32), rule_key)
  frequencies = np.bincount(np.asarray(tokens), minlength=5) / n
  assert np.abs(frequencies - p).max() < 0.005, frequencies
  assert frequencies[4] == 0  # p(4) = 0: never emitted, though the draft proposes it
  # P(accept) = sum_x min(p, q) = 0.1 + 0.2 + 0 + 0.1 + 0 = 0.4
  assert abs(float(np.mean(accepted)) - 0.4) < 0.005


def test_speculative_rule_accepts_everything_when_draft_equals_target():
  p = jnp.asarray(np.tile([[0.3, 0.3, 0.4]], (1000, 1)).astype(np.float32))
  drafts = jax.random.categorical(jax.random.key(3), jnp.log(p[0]), shape=(1000,))
  tokens, accepted = speculative.accept_or_resample(p, p, drafts.astype(jnp.int32),
                                                    jax.random.key(4))
  assert bool(accepted.all()) and np.array_equal(np.asarray(tokens), np.asarray(drafts))


@pytest.mark.parametrize('field,value,message', [
    ('temperature', -0.5, r'temperature=-0.5: must be a finite number >= 0'),
    ('top_k', -1, r'top_k=-1: must be an integer >= 0'),
    ('top_p', 0.0, r'top_p=0.0: must lie in \(0, 1\]'),
    ('top_p', 1.5, r'top_p=1.5: must lie in \(0, 1\]')])
def test_invalid_settings_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    sampling.Sampling(**{field: value})

"""Token sampling: greedy, temperature, top-k and top-p (nucleus), seeded by a JAX key.

The order is HF's: logits / temperature, keep the k most likely, renormalise, keep the smallest
set of most likely tokens whose mass reaches top_p (the most likely token always stays),
renormalise. `probabilities` gives that distribution; speculative decoding compares the main
model's and the draft's, so both sample from exactly what plain decoding samples from.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy (argmax); top_k and top_p are then irrelevant
  top_k: int = 0            # 0: off
  top_p: float = 1.0        # 1: off

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f'temperature={self.temperature}: must be a finite number >= 0')
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f'top_k={self.top_k}: must be an integer >= 0 (0 turns it off)')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p}: must lie in (0, 1] (1 turns it off)')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, V] -> the sampled distribution [B, V] float32 (needs temperature > 0)."""
  if sampling.greedy:
    raise ValueError('greedy sampling has no distribution to compare; use temperature > 0')
  logits = logits.astype(jnp.float32) / sampling.temperature
  V = logits.shape[-1]
  top_k = sampling.top_k if 0 < sampling.top_k < V else 0
  if not top_k and sampling.top_p >= 1:
    return jax.nn.softmax(logits, axis=-1)
  order = jnp.argsort(-logits, axis=-1, stable=True)  # most likely first, ties by token id
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(V, dtype=jnp.int32)[None, :]
  if top_k:
    sorted_logits = jnp.where(rank < top_k, sorted_logits, -jnp.inf)
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  if sampling.top_p < 1:
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    sorted_probs = jnp.where(mass_before < sampling.top_p, sorted_probs, 0.0)
    sorted_probs = sorted_probs / jnp.sum(sorted_probs, axis=-1, keepdims=True)
  rows = jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None]
  return jnp.zeros_like(sorted_probs).at[rows, order].set(sorted_probs)


def from_probabilities(probs: jax.Array, key: jax.Array) -> jax.Array:
  """One token per row of probs [B, V]; zero-probability tokens are never drawn."""
  log_probs = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
  return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, V] -> tokens [B] int32."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return from_probabilities(probabilities(logits, sampling), key)

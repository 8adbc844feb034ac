"""float64 numpy references and inputs for the kernel tests (no model imports: the kernels'
tests need only `kernels/`)."""

import jax.numpy as jnp
import numpy as np

SCALE = 0.15
BLOCK = 128


def numpy_mla(q_latent, q_rope, c_kv, k_rope, lengths, scale=SCALE):
  """float64, one query at a time: query t of sequence b sees lengths[b] - (Tq - 1 - t) slots."""
  q_latent, q_rope, c_kv, k_rope = (np.asarray(a, np.float64)
                                    for a in (q_latent, q_rope, c_kv, k_rope))
  B, T, N, C = q_latent.shape
  o = np.zeros((B, T, N, C))
  lse = np.full((B, T, N), -np.inf)
  for b in range(B):
    for t in range(T):
      seen = max(int(lengths[b]) - (T - 1 - t), 0)
      if seen == 0:
        continue
      scores = scale * (q_latent[b, t] @ c_kv[b, :seen].T + q_rope[b, t] @ k_rope[b, :seen].T)
      top = scores.max(axis=1, keepdims=True)
      weights = np.exp(scores - top)
      lse[b, t] = top[:, 0] + np.log(weights.sum(axis=1))
      o[b, t] = (weights / weights.sum(axis=1, keepdims=True)) @ c_kv[b, :seen]
  return o, lse


def mla_inputs(B, T, N, C, R, S, dtype, seed=0):
  """q_latent [B, T, N, C], q_rope [B, T, N, R], c_kv [B, S, C], k_rope [B, S, R], normal."""
  rng = np.random.default_rng(seed)
  shapes = [(B, T, N, C), (B, T, N, R), (B, S, C), (B, S, R)]
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def rel_err(x, y) -> float:
  """max |x - y| / max |y|."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.abs(x - y).max() / np.abs(y).max())


def blockwise_np(a_values, a_scales, b_values, b_scales) -> np.ndarray:
  """float64 sum_b (a_b . b_b) a_scales[:, b] b_scales[b, :], the scales per row and column."""
  a, b = np.asarray(a_values, np.float64), np.asarray(b_values, np.float64)
  a_s, b_s = np.asarray(a_scales, np.float64), np.asarray(b_scales, np.float64)
  N = b.shape[1]
  if b_s.shape[1] != N:  # 128x128 blocks -> per column
    b_s = np.repeat(b_s, BLOCK, axis=1)[:, :N]
  out = np.zeros((a.shape[0], N))
  for i in range(a_s.shape[1]):
    k = slice(i * BLOCK, (i + 1) * BLOCK)
    out += (a[:, k] @ b[k, :]) * a_s[:, i:i + 1] * b_s[i:i + 1, :]
  return out

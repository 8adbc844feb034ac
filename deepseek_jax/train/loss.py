"""The training objective: next-token cross-entropy + lambda * MTP loss + alpha * balance loss.

  L = CE(main) + lambda/P sum_k L_MTP,k (V3 eq. 25) + alpha * mean over MoE layers of L_bal (eq. 17)

Each cross-entropy is averaged over the positions that have a target. MTP depth k at position i
predicts token i+k+1, i.e. `targets[:, i+k]` (`targets[:, i]` is token i+1); the last k positions
have no such token and are masked. (Eq. 24 divides depth k's sum of T-k terms by T; we divide by
the number of positions that have a target, which the padding mask needs anyway.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from deepseek_jax.model import ModelOutput
from deepseek_jax.train import optimizer
from deepseek_jax.train.config import TrainConfig


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [B, T, V], targets [B, T] int, mask [B, T] -> (sum of -log p(target), count)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T], stable: subtracts the max
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(bool)
  nll = jnp.where(mask, log_z - target_logit, 0.0)  # masked ids may be padding (-1)
  return jnp.sum(nll), jnp.sum(mask.astype(jnp.float32))


def chunked_cross_entropy(head_input: jax.Array, head: Callable[[jax.Array], jax.Array],
                          targets: jax.Array, mask: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy(head(head_input), targets, mask)` for head_input [B, T, D], `chunk` positions
  at a time: each chunk's [B, chunk, V] logits live only inside it, and the backward pass makes
  them again (`jax.checkpoint`). T is padded to whole chunks, the padding masked."""
  B, T, _ = head_input.shape
  pad = -T % chunk

  def chunks(x):  # [B, T, ...] -> [T / chunk, B, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((B, -1, chunk) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(args):
    x, t, m = args
    return cross_entropy(head(x), t, m)

  sums, counts = jax.lax.map(one, (chunks(head_input), chunks(targets),
                                   chunks(mask.astype(jnp.float32))))
  return jnp.sum(sums), jnp.sum(counts)


def shift_left(x: jax.Array, k: int) -> jax.Array:
  """x [B, T] -> x[:, k:] padded with k zeros on the right: position i sees x[:, i+k]."""
  return jnp.concatenate([x[:, k:], jnp.zeros_like(x[:, :k])], axis=1)


def mtp_weight(step: jax.Array | int, train: TrainConfig) -> jax.Array:
  """lambda: `mtp_weight`, or `mtp_weight_late` from `mtp_weight_switch_step` on (V3 §4.2:
  0.3 for the first 10T tokens, 0.1 after). `step` may be traced."""
  return optimizer.switched_schedule(train.mtp_weight, train.mtp_weight_late,
                                     train.mtp_weight_switch_step)(step)


def max_violation(expert_load: jax.Array) -> jax.Array:
  """MaxVio = max_i load_i / mean load - 1 per MoE layer, averaged over layers; 0 without any."""
  if expert_load.shape[0] == 0:
    return jnp.float32(0.0)
  load = expert_load.astype(jnp.float32)  # [L_moe, E]
  mean = jnp.mean(load, axis=-1)
  vio = jnp.where(mean > 0, jnp.max(load, axis=-1) / jnp.maximum(mean, 1e-30) - 1.0, 0.0)
  return jnp.mean(vio)


def total_loss(output: ModelOutput, targets: jax.Array, mask: jax.Array, step: jax.Array | int,
               train: TrainConfig, head: Callable[[jax.Array], jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The scalar training loss and a flat dict of float32 scalar metrics.

  targets [B, T] are the next tokens (targets[:, i] = token i+1), mask [B, T] marks real ones.
  An output of `model(..., head=False)` has `head_inputs` instead of logits: `head` (the model's
  `logits`) is then applied `train.loss_chunk` positions at a time.
  """
  if output.logits is None:
    def entropy(depth, targets, mask):  # depth 0: the main head
      return chunked_cross_entropy(output.head_inputs[depth], head, targets, mask,
                                   train.loss_chunk)
    depths = output.head_inputs.shape[0] - 1
  else:
    def entropy(depth, targets, mask):
      return cross_entropy(output.mtp_logits[depth - 1] if depth else output.logits, targets,
                           mask)
    depths = output.mtp_logits.shape[0]
  ce_sum, tokens = entropy(0, targets, mask)
  ce = ce_sum / jnp.maximum(tokens, 1.0)

  depth_losses = []
  for k in range(1, depths + 1):
    # Depth k at position i predicts token i+k+1 = targets[:, i+k]; the shift pads with mask 0.
    k_sum, k_count = entropy(k, shift_left(targets, k), shift_left(mask.astype(jnp.float32), k))
    depth_losses.append(k_sum / jnp.maximum(k_count, 1.0))
  mtp = jnp.mean(jnp.stack(depth_losses)) if depth_losses else jnp.float32(0.0)

  seq_bal = output.seq_balance_loss
  bal = jnp.mean(seq_bal) if seq_bal.shape[0] else jnp.float32(0.0)  # eqs. 17-20, without alpha

  loss = ce + mtp_weight(step, train) * mtp + train.bal_alpha * bal  # eq. 25: lambda/P sum_k
  metrics = dict(loss=loss, ce_loss=ce, mtp_loss=mtp, bal_loss=bal,
                 max_vio=max_violation(output.expert_load), tokens=tokens)
  return loss, {name: value.astype(jnp.float32) for name, value in metrics.items()}

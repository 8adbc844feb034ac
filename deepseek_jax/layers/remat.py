"""Rematerialization of the decoder blocks (`ModelConfig.remat`): which of a block's activations
the backward pass keeps and which it computes again, as `jax.checkpoint` policies.

`Block` wraps its forward pass (training only: decoding has no backward pass) in
`jax.checkpoint(policy=policy(cfg.remat))`; MLA names its projections with `checkpoint_name`
(`ATTENTION_NAMES`) and the block names its input `BLOCK_INPUT`, for the policies to pick by name.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from deepseek_jax.config import REMAT_POLICIES

# The MLA projections `save_attention` keeps (mla.py tags them): the rotated query (q_nope and
# q_rope), the latent c_KV with the rope key (k_rope), and the output projection.
ATTENTION_NAMES = ('q', 'kv_latent', 'attn_out')
BLOCK_INPUT = 'block_input'


def policy(name: str) -> Callable[..., bool] | None:
  """The `jax.checkpoint` policy of `ModelConfig.remat` = name; None for 'none' (no remat)."""
  if name == 'none':  # autodiff keeps every residual: fastest, most memory
    return None
  if name == 'full':  # keep only each block's input; the backward pass reruns the whole block
    return jax.checkpoint_policies.nothing_saveable
  if name == 'save_attention':  # MLA's projections kept; the attention core and the FFN / MoE
    # (its dispatch buffers and expert hidden activations) computed again
    return jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES)
  if name == 'offload_inputs':  # as 'full', but the block input waits in host memory, not HBM
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT],
        offload_src='device', offload_dst='pinned_host')
  raise ValueError(f'model.remat={name!r}: must be one of {REMAT_POLICIES}')

"""Parameter counts of any ModelConfig, read off `jax.eval_shape` of the real model.

Total counts every `nnx.Param` of the main model (the router bias is non-gradient state, not a
parameter, as in the released checkpoint where it is a buffer). Activated per token keeps, of the
routed experts (params with a logical axis `expert`), only K of E. MTP counts the unique
parameters of the MTP modules (embedding and head are shared with the main model).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int            # main model, without MTP
  activated: int        # main model, per token (K of E routed experts)
  routed_experts: int   # main model's routed expert parameters
  embedding: int        # input embedding (the head is the same size again)
  mtp: int              # unique MTP parameters (all depths)
  mtp_activated: int    # per token, through all MTP depths


@functools.lru_cache(maxsize=8)
def _abstract_leaves(cfg: ModelConfig) -> tuple[tuple[tuple, nnx.Variable], ...]:
  """Every variable of the model as (path, abstract variable); built once per config."""
  return tuple(nnx.to_flat_state(nnx.state(model_lib.abstract(cfg))))


def count(cfg: ModelConfig) -> ParamCounts:
  total = routed = mtp = mtp_routed = embedding = 0
  for path, var in _abstract_leaves(cfg):
    if not isinstance(var, nnx.Param):
      continue  # the router bias is state, not a parameter
    size = int(np.prod(var.shape))
    is_routed = 'expert' in (var.get_metadata().get('out_sharding') or ())  # also when stacked
    if path[0] == 'mtp':
      mtp += size
      mtp_routed += size if is_routed else 0
    else:
      total += size
      routed += size if is_routed else 0
    if path[0] == 'embed':
      embedding = size
  keep = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
  return ParamCounts(
      total=total,
      activated=total - routed + round(routed * keep),
      routed_experts=routed,
      embedding=embedding,
      mtp=mtp,
      mtp_activated=mtp - mtp_routed + round(mtp_routed * keep),
  )


def shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str, tuple]]:
  """(path, shape, variable kind, logical axes) of every variable of the model."""
  rows = []
  for path, var in _abstract_leaves(cfg):
    name = '.'.join(str(p) for p in path)
    rows.append((name, tuple(var.shape), type(var).__name__,
                 tuple(var.get_metadata().get('out_sharding') or ())))
  return rows


def billions(n: int) -> str:
  return f'{n / 1e9:.3f}B' if n >= 1e8 else f'{n / 1e6:.3f}M'


def summary(cfg: ModelConfig, with_shapes: bool = True) -> str:
  """A human-readable summary: counts, then (optionally) every variable's shape and axes."""
  c = count(cfg)
  lines = [
      f'parameters (main model, without MTP): {c.total:,} ({billions(c.total)})',
      f'activated per token:                  {c.activated:,} ({billions(c.activated)}; '
      f'{billions(c.activated - c.embedding)} without the input embedding)',
      f'routed experts:                       {c.routed_experts:,} ({billions(c.routed_experts)})',
      f'MTP modules (depth {cfg.mtp_depth}, unique):        {c.mtp:,} ({billions(c.mtp)}; '
      f'{billions(c.mtp_activated)} activated per token)',
      f'KV cache per token per layer (MLA):   {cfg.kv_cache_values_per_token} values '
      f'(kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim})',
  ]
  if with_shapes:
    lines.append('')
    rows = shapes(cfg)
    width = max(len(name) for name, *_ in rows)
    for name, shape, kind, axes in rows:
      lines.append(f'{name:<{width}}  {str(shape):<22} {kind:<10} {axes}')
  return '\n'.join(lines)

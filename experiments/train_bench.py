"""Training throughput: our jitted step against transformers' DeepseekV3ForCausalLM on the same
configuration, batch and sequence length, and model FLOP utilisation against the peak matmul
FLOP/s measured on the same machine in the same run.

MFU = model FLOPs per token (analysis/flops.py: 6 x activated params + attention, MTP included
when trained) x tokens/s / peak. HF trains no MTP module, so the comparison runs ours with
`mtp_depth=0` too.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import model as model_lib
from deepseek_jax.analysis import flops
from deepseek_jax.config import ModelConfig
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import TrainConfig


def peak_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """Best float32 FLOP/s of one jitted [size, size] x [size, size] matmul."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.einsum('ZI,IO->ZO', x, y))
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def _batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len + 1))
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32)}


def ours_tokens_per_s(cfg: ModelConfig, train: TrainConfig, batch: int, seq_len: int,
                      steps: int) -> float:
  """Tokens/s of the full jitted train step (forward, backward, AdamW, bias update)."""
  graphdef, tree, rest = model_lib.split_trainable(model_lib.create(cfg, 0))
  tx = opt_lib.make_optimizer(train)
  state = step_lib.init_state(tree, tx)
  train_step = step_lib.make_train_step(graphdef, rest, cfg, train, tx)
  state, out = train_step(state, _batch(cfg, batch, seq_len, 0))  # compile
  jax.block_until_ready(out)
  start = time.perf_counter()
  for i in range(steps):
    state, out = train_step(state, _batch(cfg, batch, seq_len, i + 1))
  jax.block_until_ready(out)
  return batch * seq_len * steps / (time.perf_counter() - start)


def hf_tokens_per_s(cfg: ModelConfig, batch: int, seq_len: int, steps: int,
                    learning_rate: float) -> float:
  """Tokens/s of transformers' DeepseekV3ForCausalLM: forward, backward, torch AdamW."""
  import torch
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

  from deepseek_jax.convert import hf

  torch.manual_seed(0)
  model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf.config_to_hf(cfg))).float().train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

  def one_step(seed: int):
    data = _batch(cfg, batch, seq_len, seed)
    logits = model(torch.from_numpy(data['inputs']).long()).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                             torch.from_numpy(data['targets']).long().reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  one_step(0)  # warm-up
  start = time.perf_counter()
  for i in range(steps):
    one_step(i + 1)
  return batch * seq_len * steps / (time.perf_counter() - start)


def compare(name: str, cfg: ModelConfig, train: TrainConfig, batch: int, seq_len: int, steps: int,
            peak: float, with_hf: bool) -> dict:
  """One row: ours with and without MTP, MFU, and HF's tokens/s with the ratio."""
  row = {'name': name, 'batch': batch, 'seq_len': seq_len, 'peak_gflops': peak / 1e9}
  ours = ours_tokens_per_s(cfg, train, batch, seq_len, steps)
  per_token = flops.for_config(cfg, seq_len, with_mtp=cfg.mtp_depth > 0).total
  row.update(ours_tokens_per_s=ours, ours_mfu=per_token * ours / peak)
  if with_hf:
    plain = cfg.replace(mtp_depth=0)
    ours_plain = ours_tokens_per_s(plain, train, batch, seq_len, steps)
    theirs = hf_tokens_per_s(plain, batch, seq_len, steps, train.learning_rate)
    row.update(ours_no_mtp_tokens_per_s=ours_plain, hf_tokens_per_s=theirs,
               ratio_vs_hf=ours_plain / theirs)
  return row

"""Per-device memory of the train state on any (data, expert, plane) mesh, from `jax.eval_shape`.

The train state of `train/step.py` ({'tree': params + router biases, 'opt': the optimizer state,
'step'}) is built abstractly (no memory), given the shardings the training loop gives it
(`sharding.train_state_shardings`: parameters by their logical axis names, optimizer moments
mirroring them), and each leaf's per-device shard shape is read off its NamedSharding over an
`AbstractMesh` — so the full DeepSeek-V3 on 2,048 devices costs nothing to evaluate. Devices
hold equal shards (every sharded dimension divides), so one device's bytes are every device's.
Not counted: gradients (one more parameter-sized FP32 tree while a step runs), activations,
the expert-parallel dispatch buffers and XLA's temporaries.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
  mesh: tuple[int, int, int]  # (data, expert, plane)
  fsdp: bool
  params_bytes: int           # FP32 master weights (and router biases) on one device
  optimizer_bytes: int        # the optimizer state on one device
  total_params_bytes: int     # the whole model, unsharded

  @property
  def total_bytes(self) -> int:
    return self.params_bytes + self.optimizer_bytes


def _shard_bytes(tree, shardings) -> int:
  def one(x, s):
    return math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def abstract_train_state(cfg: ModelConfig, train: TrainConfig):
  """The train state's ShapeDtypeStructs (inside its nnx Variables, which carry the names), from
  the training loop's own initializer."""
  return jax.eval_shape(step_lib.initializer(cfg, 0, opt_lib.make_optimizer(train)))[0]


def per_device(cfg: ModelConfig, mesh: tuple[int, int, int], fsdp: bool,
               bf16_moments: bool = True) -> DeviceMemory:
  """Bytes of the train state on one device of a data x expert x plane mesh. AdamW moments in
  BF16 by default (V3 §3.3's recipe), FP32 otherwise."""
  sharding.mesh_shape(*mesh, num_devices=math.prod(mesh))
  state = abstract_train_state(cfg, TrainConfig(bf16_moments=bf16_moments))  # the rest: no shapes
  abstract_mesh = AbstractMesh(mesh, sharding.AXES)
  # the loop's layout checks (groups onto nodes, experts over expert x plane, FSDP's split),
  # with the smallest batch the mesh takes
  sharding.check_mesh(abstract_mesh, math.prod(mesh), cfg.n_routed_experts, cfg.n_group,
                      sharding.fsdp_dims(cfg) if fsdp else None)
  shardings = sharding.train_state_shardings(state, abstract_mesh, sharding.rules(fsdp))
  params = _shard_bytes(state['tree'], shardings['tree'])
  optimizer = _shard_bytes(state['opt'], shardings['opt'])
  unsharded = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                  for x in jax.tree.leaves(state['tree']))
  return DeviceMemory(tuple(mesh), fsdp, params, optimizer, unsharded)

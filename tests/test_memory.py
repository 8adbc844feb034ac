"""Per-device train-state memory on a mesh (`analysis/memory.py`), against a count by hand: every
routed-expert weight split over expert x plane, with FSDP every weight over data as well (its
`embed` dimension, or its latent one), everything else whole on every device; AdamW's two moments mirror the parameters."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.analysis import memory
from tests.tiny import tiny_config

CFG = tiny_config(num_layers=2, n_routed_experts=16, num_experts_per_tok=4)


def by_hand(mesh, fsdp: bool) -> tuple[int, int]:
  """(parameter + router bias bytes, router bias bytes) on one device, from each variable's path
  and shape."""
  data, expert, plane = mesh
  total = bias = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model_lib.abstract(CFG))):
    shape, names = leaf.get_value().shape, leaf.get_metadata()['out_sharding']
    if names[0] == 'layers':  # a stack of layers (scan_layers): whole on every device
      shape, names = (shape[0] * shape[1],) + shape[2:], names[1:]
    split = 1
    if names[0] == 'expert' and len(shape) == 3:  # w_gate / w_up / w_down [E, ., .]
      split *= expert * plane
    elif names == ('expert',) or path[-1] == 'router_kernel':  # router bias / kernel [., E]
      split *= expert * plane
    if fsdp and {'embed', 'q_latent', 'kv_latent'} & set(names):  # one of them, over data
      split *= data
    total += math.prod(shape) * 4 // split
    bias += math.prod(shape) * 4 // split if path[-1] == 'router_bias' else 0
  return total, bias


@pytest.mark.parametrize('mesh,fsdp', [((1, 1, 1), False), ((2, 2, 2), False), ((2, 2, 2), True),
                                       ((1, 2, 4), True), ((4, 1, 2), True)])
def test_per_device_bytes_match_a_count_by_hand(mesh, fsdp):
  total, bias = by_hand(mesh, fsdp)
  m = memory.per_device(CFG, mesh, fsdp, bf16_moments=False)
  assert m.params_bytes == total
  # AdamW's mu and nu for every parameter (the router biases have their own, stateless rule),
  # plus a few step counters
  assert 0 <= m.optimizer_bytes - 2 * (total - bias) <= 64
  bf16 = memory.per_device(CFG, mesh, fsdp, bf16_moments=True)
  assert 0 <= bf16.optimizer_bytes - (total - bias) <= 64  # two BF16 moments = one FP32 copy
  assert m.total_params_bytes == by_hand((1, 1, 1), False)[0]


def test_mesh_sizes_that_do_not_fit_are_named():
  with pytest.raises(ValueError, match='mesh.data=0'):
    memory.per_device(CFG, (0, 1, 1), False)
  with pytest.raises(ValueError, match='n_group=4 must divide by mesh expert=8'):
    memory.per_device(CFG, (1, 8, 1), False)

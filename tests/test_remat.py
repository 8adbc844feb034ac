"""Rematerialization policies (`model.remat`, layers/remat.py): the loss and gradients of no remat,
and less kept for the backward pass; host offload compiled for a TPU chip on this CPU.

XLA:CPU's `temp_size_in_bytes` does not move with remat (the same figure with and without it,
even for a toy stack of matmuls), so on CPU what the backward pass keeps is read from the traced
residuals (`jax.ad_checkpoint.print_saved_residuals`); the compiled peak comes from a TPU compile.
"""

import contextlib
import functools
import importlib.util
import io
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax import model as model_lib
from deepseek_jax.config import REMAT_POLICIES
from deepseek_jax.layers import remat
from tests.tiny import random_model, tiny_config

# Before libtpu loads: no metadata server to ask, and another process may hold its lock file.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None

# A dense block, an MoE block and the MTP block, one module each: the residuals below are read by
# name per block, and a scan's residuals are its stacked outputs, whose names the trace drops.
CFG = tiny_config(num_layers=2, scan_layers=False)
# The same kinds of block, compiled 4 times (no MTP), stacked: each policy inside the scan body.
EQUAL_CFG = CFG.replace(mtp_depth=0, scan_layers=True)
TOKENS = jax.random.randint(jax.random.key(0), (2, 32), 0, CFG.vocab_size)
LONG = jax.random.randint(jax.random.key(1), (2, 256), 0, CFG.vocab_size)  # T^2 terms dominate


def _loss(graphdef):
  def loss(state, tokens):
    out = model_lib.apply(graphdef, state, tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return nll + 1e-3 * jnp.sum(out.mtp_logits ** 2) + jnp.sum(out.seq_balance_loss)  # MTP, MoE
  return loss


def _split(name, cfg=CFG):
  return nnx.split(random_model(cfg.replace(remat=name)))


@functools.cache
def _saved(name) -> list[str]:
  """`print_saved_residuals` of the loss at B x T = 2 x 256: one line per array the backward
  pass keeps (a trace, no compile)."""
  graphdef, state = _split(name)
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    jax.ad_checkpoint.print_saved_residuals(_loss(graphdef), state, LONG)
  return text.getvalue().splitlines()


def _activation_bytes(lines: list[str]) -> int:
  """Bytes of the saved residuals that are not parameters ('f32[2,32,4] named ...' lines)."""
  total = 0
  for line in lines:
    if 'from the argument' in line:
      continue
    dtype, dims = re.match(r'(\w+)(?:<\w+>)?\[([\d,]*)\]', line).groups()  # f32<host>[2,8]
    total += math.prod(int(d) for d in dims.split(',') if d) * jnp.dtype(
        {'f32': 'float32', 'i32': 'int32', 'bool': 'bool'}[dtype]).itemsize
  return total


@pytest.fixture(name='runs', scope='module')
def runs_fixture():
  """{policy: (loss, grads)} from one jitted value_and_grad each, on the same parameters."""
  out = {}
  for name in REMAT_POLICIES:
    graphdef, state = _split(name, EQUAL_CFG)
    out[name] = jax.jit(jax.value_and_grad(_loss(graphdef)))(state, TOKENS)
  return out


@pytest.mark.parametrize('name', [p for p in REMAT_POLICIES if p != 'none'])
def test_every_policy_gives_the_loss_and_gradients_of_none(runs, name):
  (ref_loss, ref_grads), (loss, grads) = runs['none'], runs[name]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  ref = dict(nnx.to_flat_state(ref_grads))
  for path, g in nnx.to_flat_state(grads):
    g, r = np.asarray(g.get_value()), np.asarray(ref[path].get_value())
    assert np.linalg.norm(g - r) <= 1e-6 * np.linalg.norm(r), path


def test_full_remat_keeps_only_the_block_inputs():
  none, full = (_activation_bytes(_saved(name)) for name in ('none', 'full'))
  print(f'activations kept for the backward pass, B x T = {LONG.shape}: none {none:,} B, '
        f'full {full:,} B')
  assert full < none / 5, (none, full)  # measured 11x: the [B, N, T, T] probabilities go


def test_save_attention_keeps_the_named_attention_projections():
  lines = _saved('save_attention')
  for tag in remat.ATTENTION_NAMES:
    assert sum(f"named '{tag}'" in line for line in lines) >= 3, (tag, lines)  # every block
  assert not any('named' in line for line in _saved('full'))
  kept = {name: _activation_bytes(_saved(name)) for name in ('none', 'save_attention', 'full')}
  print(f'activations kept, B x T = {LONG.shape}: {kept}')
  assert kept['full'] < kept['save_attention'] < kept['none'] / 5, kept  # 1.4, 2.0, 15.0 MB


def test_offload_inputs_moves_each_block_input_to_host_memory():
  """On CPU the residuals are the block inputs, put in host memory (pinned_host)."""
  lines = _saved('offload_inputs')
  assert sum('<host>' in line and 'device_put' in line for line in lines) == 3, lines


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install -e ".[test]" '
                    'installs it): TPU ahead-of-time compilation needs its compiler')
def test_remat_compiles_for_a_tpu_chip_with_host_offload():
  """A two-block model's grad step compiled for one v5e chip: 'full' lowers the peak,
  'offload_inputs' holds the block inputs in host memory (XLA's host temporaries)."""
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu').devices
  chip = NamedSharding(Mesh(devices[:1], ('chip',)), PartitionSpec())
  cfg = tiny_config(num_layers=2, first_k_dense=2, mtp_depth=0)  # two dense blocks
  B, T, D = 2, 256, cfg.hidden_size
  stats = {}
  for name in ('none', 'full', 'offload_inputs'):
    graphdef, state = nnx.split(model_lib.abstract(cfg.replace(remat=name)))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=chip), state)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=chip)
    stats[name] = jax.jit(jax.grad(_loss(graphdef))).lower(state, tokens).compile(
        ).memory_analysis()
  peak = {name: s.peak_memory_in_bytes for name, s in stats.items()}
  print(f'v5e chip, grad step, B {B} T {T}: peak bytes {peak}, offload_inputs host '
        f'temporaries {stats["offload_inputs"].host_temp_size_in_bytes:,}')
  assert peak['full'] < 0.85 * peak['none'], peak  # measured 0.74
  assert stats['none'].host_temp_size_in_bytes == 0
  assert stats['offload_inputs'].host_temp_size_in_bytes >= 2 * B * T * D * 4  # both inputs


def test_an_unknown_policy_is_refused_by_name():
  with pytest.raises(ValueError, match=r'ModelConfig\.remat'):
    CFG.replace(remat='some')
  with pytest.raises(ValueError, match=r'model\.remat'):
    remat.policy('some')

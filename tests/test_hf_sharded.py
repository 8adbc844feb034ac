"""The streaming, sharded import (`convert.hf.load_pretrained(..., mesh=...)`) against the plain
one: same logits on a mesh as on one device, each device holding only its block (its own
experts), and two processes each reading only their own half of the routed experts' tensors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

from flax import nnx  # noqa: E402

from deepseek_jax import model as model_lib  # noqa: E402
from deepseek_jax import sharding  # noqa: E402
from deepseek_jax.convert import hf as convert  # noqa: E402
from deepseek_jax.convert import safetensors_io  # noqa: E402
from tests import processes as processes_lib  # noqa: E402
from tests.test_hf_parity import hf_model, tokens_for  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
E = 8  # routed experts of the tiny checkpoint (tests/test_hf_parity.py BASE)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf')
  hf_model(seed=3, num_hidden_layers=3).save_pretrained(directory, max_shard_size='300KB')
  return directory


def logits_on(model, tokens, mesh=None):
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: model_lib.apply(graphdef, state, tokens).logits)
  if mesh is None:
    return np.asarray(forward(state, jnp.asarray(tokens)))
  with jax.set_mesh(mesh):
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
    return np.asarray(forward(state, tokens))


@pytest.mark.parametrize('scan_layers', [True, False])
def test_sharded_import_gives_the_single_device_logits(saved, scan_layers):
  """FSDP rules on a (2, 2, 2) mesh: the MoE runs expert-parallel over the imported blocks."""
  tokens = np.concatenate([tokens_for(128, seed=s) for s in range(4)])  # B 8: one per device
  _, plain = convert.load_pretrained(saved, scan_layers=scan_layers)
  mesh = sharding.make_mesh(2, 2, 2)
  cfg, sharded = convert.load_pretrained(saved, mesh=mesh, rules=sharding.rules(fsdp=True),
                                         scan_layers=scan_layers)
  want, got = logits_on(plain, tokens), logits_on(sharded, tokens, mesh)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

  # Each device holds its block of every parameter, equal to the plain import's.
  prefix, index = model_lib.layer_location(cfg, cfg.num_layers - 1)
  stack = sharded.moe_layers if scan_layers else sharded.layers[cfg.num_layers - 1]
  w_gate = stack.ffn.w_gate.get_value()
  full = np.asarray(plain.block(cfg.num_layers - 1).ffn.w_gate[...])
  expert_dim = 1 if scan_layers else 0
  assert w_gate.shape[expert_dim] == E
  for shard in w_gate.addressable_shards:
    block = np.asarray(shard.data)
    assert block.shape[expert_dim] == E // 4  # experts over expert x plane = 4
    assert block.shape[expert_dim + 1] == cfg.hidden_size // 2  # and FSDP's D over data = 2
    layer = shard.data[index] if scan_layers else shard.data
    np.testing.assert_array_equal(np.asarray(layer), full[shard.index[-3:]])
  assert prefix[0] == ('moe_layers' if scan_layers else 'layers')


def test_param_dtype_bfloat16_rounds_the_float32_import(saved):
  _, plain = convert.load_pretrained(saved)
  _, half = convert.load_pretrained(saved, param_dtype=jnp.bfloat16)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(plain)),
                               nnx.to_flat_state(nnx.state(half))):
    a, b = a.get_value(), b.get_value()
    if path[-1] == 'router_bias':  # a variable, not a parameter: stays float32
      assert b.dtype == jnp.float32
      np.testing.assert_array_equal(b, a)
    else:
      assert b.dtype == jnp.bfloat16, path
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a.astype(jnp.bfloat16)))


def test_missing_shard_and_unknown_quantization_are_named(saved, tmp_path):
  for file in saved.iterdir():
    (tmp_path / file.name).write_bytes(file.read_bytes())
  shards = sorted(tmp_path.glob('*.safetensors'))
  assert len(shards) > 2
  shards[1].unlink()
  with pytest.raises(FileNotFoundError, match=shards[1].name):
    convert.load_pretrained(tmp_path)
  (tmp_path / shards[1].name).write_bytes((saved / shards[1].name).read_bytes())
  config = json.loads((tmp_path / 'config.json').read_text())
  config['quantization_config'] = {'quant_method': 'bitsandbytes_4bit'}
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='quant_method.*bitsandbytes_4bit'):
    convert.load_pretrained(tmp_path)


PROCESS = """
import json, os, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
from deepseek_jax import sharding
from deepseek_jax.convert import hf, safetensors_io

opened = {}
get = safetensors_io.SafetensorsFile.get
def counting_get(self, name):
  w = get(self, name)
  opened[name] = int(w.nbytes)
  return w
safetensors_io.SafetensorsFile.get = counting_get
mesh = sharding.make_mesh(1, 2, 4)  # expert 0 is process 0's devices, expert 1 process 1's
cfg, model = hf.load_pretrained(sys.argv[3], mesh=mesh, rules=sharding.rules())
w_gate = model.moe_layers.ffn.w_gate.get_value()
held = sorted({j for s in w_gate.addressable_shards for j in range(E)[s.index[1]]})
print(json.dumps({'opened': {n: b for n, b in opened.items() if '.experts.' in n},
                  'held': held, 'blocks_ok': all(np.array_equal(np.asarray(s.data), full[s.index])
                  for s in w_gate.addressable_shards)}))
"""


@pytest.mark.slow
def test_two_processes_each_read_only_their_own_experts(saved, tmp_path):
  _, plain = convert.load_pretrained(saved)
  np.save(tmp_path / 'w_gate.npy', np.asarray(plain.moe_layers.ffn.w_gate[...]))
  script = f'E = {E}\nimport numpy\nfull = numpy.load({str(tmp_path / "w_gate.npy")!r})\n'
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  address = f'127.0.0.1:{processes_lib.free_port()}'
  processes = [subprocess.Popen(
      [sys.executable, '-c', script + PROCESS, address, str(i), str(saved)], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = processes_lib.finish(processes, 180)
  reports = []
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
    reports.append(json.loads(out.strip().splitlines()[-1]))

  ckpt = safetensors_io.Checkpoint(saved)
  routed = {n: int(np.prod(ckpt.shape(n))) * ckpt.dtype(n).itemsize for n in ckpt.names()
            if '.experts.' in n}
  assert reports[0]['held'] == list(range(E // 2))
  assert reports[1]['held'] == list(range(E // 2, E))
  for report in reports:
    assert report['blocks_ok']
    read = sum(report['opened'].values())
    assert read == sum(routed.values()) // 2, (read, sum(routed.values()))
    held = set(report['held'])
    assert all(int(n.split('.experts.')[1].split('.')[0]) in held for n in report['opened'])
  assert not set(reports[0]['opened']) & set(reports[1]['opened'])


@pytest.mark.parametrize('fsdp', [False, True])
def test_generation_on_a_mesh_equals_one_device(saved, fsdp):
  """Greedy decoding with the weights read onto a (1, 2, 4) mesh, three prompts padded to the 8
  rows the batch axes need, against the plain import on one device, token for token."""
  from deepseek_jax.inference import decode  # pylint: disable=import-outside-toplevel
  prompts = [[5, 17, 3], [9, 1, 2, 77, 6], [100]]
  _, plain = convert.load_pretrained(saved)
  want = decode.generate(plain, prompts, 6)
  mesh = sharding.make_mesh(1, 2, 4)
  _, sharded = convert.load_pretrained(saved, mesh=mesh, rules=sharding.rules(fsdp))
  got = decode.generate(sharded, prompts, 6, mesh=mesh)
  assert got.tokens.shape == want.tokens.shape == (3, 6)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.prompt_lengths, [3, 5, 1])

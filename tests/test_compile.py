"""`experiments.compile`: the real train and decode steps compiled ahead of time for a v5e:2x2
slice (4 devices) on the CPU, with the expert-parallel mesh data 1 x expert 2 x plane 2.

The library call (`analysis.compile.compile_report`) runs in-process; the command line once, in a
subprocess, on the case that must not crash: a batch too big for the chips (exit 0, fits false).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import pathlib

import pytest

# Before libtpu loads: no metadata server to ask, and other processes may hold libtpu's lock.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from deepseek_jax.analysis import compile as compile_lib  # noqa: E402
from deepseek_jax.analysis import memory  # noqa: E402
from deepseek_jax.train.config import resolve  # noqa: E402
from experiments.configs import tiny  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install '
                                  '-e ".[tpu]" or ".[test]" installs it)')
TOPOLOGY = 'v5e:2x2'
MESH = dict(data=1, expert=2, plane=2)
# The tiny model cut down for compile time: one dense and one MoE layer (+ MTP), 8 x 32 tokens.
SMALL = dict(num_layers=2, batch_size=8, seq_len=32)
HUGE_BATCH = 16384  # x 512 tokens: the float32 logits alone are 16 GiB per v5e device
ARGUMENT_PADDING = 0.15  # TPU tiles pad narrow arrays (see the test)


def small_config(num_layers=SMALL['num_layers'], batch_size=SMALL['batch_size'],
                 seq_len=SMALL['seq_len']):
  config = tiny.get_config()
  config.model.num_layers = num_layers
  config.train.batch_size, config.train.seq_len = batch_size, seq_len
  config.mesh.update(MESH)
  return config


@pytest.fixture(scope='module', name='train_report')
def train_report_fixture():
  return compile_lib.compile_report(small_config(), TOPOLOGY, 'train')


@needs_libtpu
def test_train_step_compiles_with_all_to_alls_and_fits(train_report):
  r = train_report
  assert (r['devices'], r['device_kind'], r['devices_per_chip']) == (4, 'TPU v5 lite', 1)
  assert r['mesh'] == {**MESH, 'fsdp': False, 'devices_used': 4}
  assert r['fits'] is True
  assert r['hbm_bytes_per_device'] == 16 * 2**30
  # hierarchical dispatch: hop 1 over 'expert', hop 2 over 'plane', combine back, fwd and bwd
  assert r['collectives']['all-to-all']['count'] > 0
  assert r['collectives']['all-to-all']['bytes'] > 0
  assert r['collectives']['all-reduce']['count'] > 0  # gradients of replicated weights
  mem = r['bytes_per_device']
  assert mem['temp'] > 0 and mem['code'] > 0
  assert r['total_bytes_per_device'] <= r['hbm_bytes_per_device']
  assert 0 < r['flops_per_device']
  assert json.loads(json.dumps(r)) == r


@needs_libtpu
def test_argument_bytes_are_the_train_state_and_batch_per_device(train_report):
  """Cross-check with analysis/memory.py's per-device figure of the same state on the same mesh:
  the arguments are the donated state (aliased to the output) and the int32 inputs and targets.
  XLA lays arrays out in TPU tiles (8 x 128 for 32-bit values), which pads the tiny model's narrow
  ones (C = 32, R = 16, 16 router biases): 10.1% more here, so up to ARGUMENT_PADDING above."""
  run = resolve(small_config())
  m = memory.per_device(run.model, tuple(MESH.values()), False, run.train.bf16_moments)
  state = m.total_bytes + 4  # + the int32 step counter
  batch = 2 * SMALL['batch_size'] * SMALL['seq_len'] * 4 // train_report['devices']
  mem = train_report['bytes_per_device']
  assert state + batch <= mem['argument'] <= (1 + ARGUMENT_PADDING) * (state + batch)
  assert state <= mem['alias'] < mem['argument']  # the state is donated, the batch is not
  assert mem['alias'] <= (1 + ARGUMENT_PADDING) * state


@needs_libtpu
def test_decode_step_compiles():
  r = compile_lib.compile_report(small_config(), TOPOLOGY, 'decode')
  assert r['fits'] is True
  assert r['bytes_per_device']['alias'] > 0  # the cache is donated
  assert r['model_flops_per_device'] > 0 and r['flops_per_device'] > 0


@needs_libtpu
def test_decode_in_bfloat16_and_with_weights_kept_in_fp8():
  """`param_dtype='bfloat16'` halves the float parameters; `fp8_weights` keeps the FP8 set in
  E4M3 (1 byte plus a float32 scale per column of 128 rows: at the tiny widths, I = 32 or 48,
  one scale per 32 or 48 bytes). The cache and inputs are the same in all three."""
  reports = {}
  for name, model, dtype in (('float32', {}, 'float32'), ('bfloat16', {}, 'bfloat16'),
                             ('fp8', dict(precision='fp8', fp8_weights=True), 'bfloat16')):
    config = small_config()
    config.model.update(model)
    reports[name] = compile_lib.compile_report(config, TOPOLOGY, 'decode', param_dtype=dtype)
  args = {name: r['bytes_per_device']['argument'] for name, r in reports.items()}
  print(args)
  assert args['fp8'] < args['bfloat16'] < args['float32']
  assert reports['fp8']['fp8_weights'] and reports['fp8']['fits']
  with pytest.raises(ValueError, match="param_dtype='bfloat16': training keeps float32"):
    compile_lib.target(small_config(), compile_lib.topology_devices(TOPOLOGY), 'train',
                       param_dtype='bfloat16')


@needs_libtpu
def test_a_batch_too_big_is_reported_not_raised_by_the_command():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.compile', f'--topology={TOPOLOGY}',
       f'--config.model.num_layers={SMALL["num_layers"]}',
       f'--config.train.batch_size={HUGE_BATCH}', '--config.train.seq_len=512',
       *(f'--config.mesh.{k}={v}' for k, v in MESH.items())],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['fits'] is False and r['what'] == 'train' and r['batch'] == HUGE_BATCH
  assert 'HBM' in r['error'] or 'memory' in r['error'], r['error']
  assert max(r['error_bytes'].values()) > 16 * 2**30


def test_collectives_are_counted_from_hlo_text():
  hlo = '\n'.join([
      '  %all-to-all.3 = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%a, %b), channel_id=1',
      '  %ag-start = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%x), dimensions={0}',
      '  %ag-done = bf16[16,8]{1,0:T(8,128)(2,1)} all-gather-done(%ag-start)',
      '  ROOT %all-reduce.1 = f32[] all-reduce(%s), to_apply=%add',
      '  %fusion = f32[4] fusion(%p), kind=kLoop, metadata={op_name="all-to-all"}',
  ])
  c = compile_lib.collectives(hlo)
  assert c['all-to-all'] == {'count': 1, 'bytes': 2 * 2 * 8 * 4}
  assert c['all-gather'] == {'count': 1, 'bytes': 16 * 8 * 2}
  assert c['all-reduce'] == {'count': 1, 'bytes': 4}
  assert c['reduce-scatter'] == c['collective-permute'] == {'count': 0, 'bytes': 0}


def test_out_of_memory_message_names_its_bytes():
  error = RuntimeError('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory '
                       'in memory space hbm. Used 20.5G of 15.75G hbm. Exceeded hbm capacity by '
                       '4.75G. the total memory required for HLO temporaries (336.18G) exceeds '
                       'available HBM (95.74G)')
  oom = compile_lib.out_of_memory(error)
  assert oom['bytes_named']['HLO temporaries'] == int(336.18 * 2**30)
  assert oom['bytes_named']['available HBM'] == int(95.74 * 2**30)
  assert compile_lib.out_of_memory(ValueError('shapes do not match')) is None


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(compile_lib.LibtpuMissing, match=r'pip install -e "\.\[tpu\]"'):
    compile_lib.topology_devices(TOPOLOGY)


def test_hbm_table_covers_the_generations_and_counts_devices_per_chip():
  assert set(compile_lib.HBM_PER_CHIP) == {'v4', 'v5e', 'v5p', 'v6e', 'tpu7x'}
  assert math.isclose(compile_lib.HBM_PER_CHIP['tpu7x'][0] / 2**30, 192)


@needs_libtpu
def test_an_unknown_topology_is_named():
  with pytest.raises(ValueError, match=r"--topology='v9x:1x1': libtpu does not know this slice"):
    compile_lib.topology_devices('v9x:1x1')

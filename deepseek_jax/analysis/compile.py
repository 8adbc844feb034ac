"""Ahead-of-time compilation of the real train, prefill and decode steps for a TPU slice, on any
machine (`python -m experiments.compile`; deepseek_jax/DESIGN.md, "Environment facts").

With libtpu installed (`pip install -e ".[tpu]"`), `get_topology_desc` gives the devices of a
slice such as `v5p:8x8x16` without the slice. Over them this module builds what the training loop
and the decoder build over real devices: the mesh of `config.mesh` (`train.loop.build_mesh`), the
abstract train state and its shardings (`train.loop.train_state_layout`, eval_shape outside
`jax.set_mesh`), the jitted step (`train.step.make_train_step`; `inference.decode.jit_prefill` /
`jit_step` with the model's state sharded by the same logical rules and a cache of batch x seq_len
split over the batch axes), then `.lower(...)` under `jax.set_mesh` and `.compile()` with XLA's TPU
compiler. It reads off the compiled step:
- per-device bytes by kind (`memory_analysis()`), XLA's peak where it gives one, against the
  chip's HBM per device (`HBM_PER_CHIP` over the devices per chip: libtpu lists the two
  TensorCores of a tpu7x or v4 chip as two devices);
- FLOPs per device from `cost_analysis()` beside the model's own count (`analysis/flops.py`);
- the collectives of the optimized HLO per kind: count and bytes of their results.
XLA counts a loop body once, in FLOPs and collectives alike: the layers are unrolled today, but
the expert-parallel dispatch loops over 1,024-token chunks (`lax.map`) once a device has more.
A step that does not fit is a report with `fits: false`: XLA's TPU compiler refuses such a
program ("RESOURCE_EXHAUSTED ... the total memory required for HLO temporaries (336.18G) exceeds
available HBM (95.74G)"), and that message and the byte counts it names are reported.
Switches left at 'auto' that follow `jax.default_backend()` see the host's 'cpu' (e.g.
`model.moe_matmul`: pass `ragged_dot` to compile what a TPU host runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import re
import time
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax import model as model_lib
from deepseek_jax import sharding
from deepseek_jax.analysis import flops as flops_lib
from deepseek_jax.analysis import params as params_lib
from deepseek_jax.inference import cache as cache_lib
from deepseek_jax.inference import decode as decode_lib
from deepseek_jax.inference import sampling as sampling_lib
from deepseek_jax.layers import param as param_lib
from deepseek_jax.train import loop as loop_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import RunConfig, resolve

GiB = 2**30
WHAT = ('train', 'prefill', 'decode')

# HBM per chip, from Google Cloud's TPU pages (cloud.google.com/tpu/docs/<page>). The pages print
# "GB" for v5e, v5p and v6e; they are GiB: the TPU7x page's comparison table lists v5p 95 and v6e
# 32 "HBM capacity per chip (GiB)", and libtpu's own limit for a v5p device is 95.74 GiB.
HBM_PER_CHIP: dict[str, tuple[int, str]] = {
    'v4': (32 * GiB, 'tpu/docs/v4: "HBM2 capacity and bandwidth: 32 GiB, 1200 GBps"'),
    'v5e': (16 * GiB, 'tpu/docs/v5e: "HBM capacity per chip: 16 GB"'),
    'v5p': (95 * GiB, 'tpu/docs/v5p: "HBM2e capacity and bandwidth: 95GB, 2765 GBps"; '
            'tpu/docs/tpu7x: 95 GiB'),
    'v6e': (32 * GiB, 'tpu/docs/v6e: "HBM capacity per chip: 32 GB"; tpu/docs/tpu7x: 32 GiB'),
    'tpu7x': (192 * GiB, 'tpu/docs/tpu7x: "HBM capacity per chip (GiB): 192", two TensorCores '
              '(two JAX devices) per chip'),
}
# JAX's device_kind of each generation (topology names start with the generation's key).
DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5': 'v5p', 'TPU v6 lite': 'v6e',
                'TPU7x': 'tpu7x'}
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
MEMORY_KINDS = {  # report name: CompiledMemoryStats attribute
    'argument': 'argument_size_in_bytes', 'output': 'output_size_in_bytes',
    'temp': 'temp_size_in_bytes', 'alias': 'alias_size_in_bytes',
    'code': 'generated_code_size_in_bytes',
    'host_argument': 'host_argument_size_in_bytes', 'host_output': 'host_output_size_in_bytes',
    'host_temp': 'host_temp_size_in_bytes', 'host_alias': 'host_alias_size_in_bytes',
    'host_code': 'host_generated_code_size_in_bytes',
}
TPU_EXTRA = ('libtpu is not installed: TPU ahead-of-time compilation needs its compiler. '
             'Install the extra: pip install -e ".[tpu]"')


class LibtpuMissing(RuntimeError):
  pass


@dataclasses.dataclass
class Target:
  """A jitted function and the abstract arguments (with shardings) to lower it with."""
  jitted: Any
  args: tuple
  mesh: jax.sharding.Mesh
  run: RunConfig
  model_flops: float  # the model's own FLOPs for the whole step (all devices)
  cache: str = ''     # how the cache is laid out (prefill, decode)


# ---- the topology ----------------------------------------------------------------------------

def topology_devices(topology: str) -> list:
  """The devices of a TPU slice, e.g. 'v5p:8x8x16' (1,024 devices), without the slice."""
  if importlib.util.find_spec('libtpu') is None:
    raise LibtpuMissing(TPU_EXTRA)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform='tpu').devices)
  except jax.errors.JaxRuntimeError as e:  # libtpu's words, e.g. "Invalid TPU external name"
    raise ValueError(f'--topology={topology!r}: libtpu does not know this slice ({e}); names it '
                     'accepts look like v5e:2x2, v5p:8x8x16, v6e:16x16, tpu7x:4x4x8') from e


def generation(topology: str, device_kind: str) -> str | None:
  name = topology.split(':', 1)[0].lower()
  return name if name in HBM_PER_CHIP else DEVICE_KINDS.get(device_kind)


def devices_per_chip(devices) -> int:
  """JAX devices per chip: cores that are separate devices (tpu7x, v4: 2) share a chip's coords."""
  chips = {tuple(getattr(d, 'coords', (d.id,))) for d in devices}
  return max(len(devices) // max(len(chips), 1), 1)


def hbm_per_device(topology: str, devices) -> int | None:
  gen = generation(topology, devices[0].device_kind)
  if gen is None:
    return None
  return HBM_PER_CHIP[gen][0] // devices_per_chip(devices)


# ---- the steps -------------------------------------------------------------------------------

def _sds(shape, dtype, sharding_):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def train_target(config, devices, explicit: Collection[str] = ()) -> Target:
  """The training loop's jitted step (`train.loop.start_session` builds the same) with the
  abstract train state and a global batch of train.batch_size x train.seq_len tokens."""
  run = resolve(config, explicit)
  t = run.train
  mesh, table = loop_lib.build_mesh(run.mesh, run.model, t.batch_size, devices)
  layout = loop_lib.train_state_layout(run, config.seed, mesh, table)
  if jax.tree.leaves(layout.rest):  # the step closes over the rest: it must hold no arrays
    raise ValueError('the model has non-trainable arrays (rest); the ahead-of-time train step '
                     'cannot close over abstract ones')
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = step_lib.make_train_step(layout.graphdef, layout.rest, run.model, t, layout.tx,
                                    layout.shardings, batch_sharding)
  tokens = _sds((t.batch_size, t.seq_len), jnp.int32, batch_sharding)
  args = (sharding.with_shardings(layout.state, layout.shardings),
          {'inputs': tokens, 'targets': tokens})
  per_token = flops_lib.for_config(run.model, t.seq_len, with_mtp=run.model.mtp_depth > 0).total
  return Target(jitted, args, mesh, run, per_token * t.batch_size * t.seq_len)


def inference_target(config, devices, what: str, param_dtype: str = 'float32') -> Target:
  """The decoder's jitted prefill (train.seq_len prompt tokens per sequence) or decode step (one
  token), batch train.batch_size, over a latent cache of train.seq_len slots; the model's state
  sharded by the rules table, the cache split over the batch axes. Float parameters in
  `param_dtype` (as `load_pretrained(param_dtype=...)` serves them); weights kept in E4M3
  (`fp8_weights`) and router biases stay as they are."""
  run = resolve(config)
  cfg, t = run.model, run.train
  B, S = t.batch_size, t.seq_len
  mesh, table = loop_lib.build_mesh(run.mesh, cfg, B, devices)
  graphdef, state = nnx.split(model_lib.abstract(cfg))
  state = _with_param_dtype(state, jnp.dtype(param_dtype))
  state = sharding.with_shardings(state, sharding.variable_shardings(state, mesh, table))
  cache = jax.eval_shape(lambda: cache_lib.init(cfg, B, S))
  cache = sharding.with_shardings(cache, cache_lib.shardings(cache, mesh))
  rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH))
  replicated = sharding.replicated(mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = _sds(key.shape, key.dtype, replicated)
  statics = (graphdef, sampling_lib.Sampling())
  counts = params_lib.count(cfg)
  matmul = 2 * (counts.activated - counts.embedding)  # forward, per token
  note = (f'latent cache [B={B}, S={cache_lib.max_len(cache)}] x {cfg.num_layers} layers, '
          'split over the batch axes')
  if what == 'prefill':
    fwd = flops_lib.for_config(cfg, S).total / 3  # forward = a third of the training count
    args = (*statics, state, _sds((B, S), jnp.int32, sharding.batch_sharding(mesh)),
            _sds((B,), jnp.int32, rows), cache, key)
    return Target(decode_lib.jit_prefill, args, mesh, run, fwd * B * S, note)
  # decode: the matmuls plus absorbed attention over a full cache (scores over C + R, output C)
  attention = 2 * cfg.num_layers * cfg.num_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * S
  args = (*statics, state, _sds((B,), jnp.int32, rows), cache, key,
          _sds((), jnp.int32, replicated))
  return Target(decode_lib.jit_step, args, mesh, run, (matmul + attention) * B, note)


def _with_param_dtype(state: nnx.State, dtype) -> nnx.State:
  """The abstract state with the variables that follow the parameter dtype
  (`param.follows_param_dtype`, as `load_pretrained` has them) in `dtype`."""
  def cast(variable):
    if param_lib.follows_param_dtype(variable):
      return variable.replace(jax.ShapeDtypeStruct(variable.get_value().shape, dtype))
    return variable
  return nnx.from_flat_state([(path, cast(v)) for path, v in nnx.to_flat_state(state)])


def target(config, devices, what: str, explicit: Collection[str] = (),
           param_dtype: str = 'float32') -> Target:
  """`what`'s target; `param_dtype` is the float parameters' dtype of prefill and decode
  (training keeps float32 masters)."""
  if what not in WHAT:
    raise ValueError(f'what={what!r}: must be one of {WHAT}')
  if what == 'train':
    if param_dtype != 'float32':
      raise ValueError(f'param_dtype={param_dtype!r}: training keeps float32 master weights')
    return train_target(config, devices, explicit)
  return inference_target(config, devices, what, param_dtype)


# ---- reading the compiled step ---------------------------------------------------------------

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
                'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8,
                'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\(')


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else None)
    if size is not None:
      out.append(int(math.prod(int(d) for d in dims.split(',') if d) * size))
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives in an optimized HLO module, bytes from each
  one's result shape (per device). An async pair (`all-gather-start` / `-done`) counts once, by
  its `-done` result; a collective wrapped in an async computation counts where it is defined."""
  out = {kind: {'count': 0, 'bytes': 0} for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shape, op = match.groups()
    if op.endswith('-start'):
      continue
    kind = op[:-len('-done')] if op.endswith('-done') else op
    if kind.startswith('ragged-'):
      kind = kind[len('ragged-'):]
    if kind in out:
      out[kind]['count'] += 1
      out[kind]['bytes'] += sum(_array_bytes(shape))
  return out


def memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  return {name: int(getattr(stats, attr)) for name, attr in MEMORY_KINDS.items()
          if getattr(stats, attr, None) is not None}


def total_bytes(mem: dict[str, int]) -> int:
  """Arguments + outputs not aliased to them + temporaries + code, on the device."""
  return mem['argument'] + mem['output'] - mem['alias'] + mem['temp'] + mem['code']


def peak_bytes(compiled) -> int | None:
  peak = getattr(compiled.memory_analysis(), 'peak_memory_in_bytes', None)
  return int(peak) if peak else None


def flops_per_device(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


_NAMED_BYTES = re.compile(r'(\w+ \w+) \((\d+(?:\.\d+)?)([KMGT]?)i?B?\)')
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def out_of_memory(error: Exception) -> dict | None:
  """The message and the byte counts it names ('HLO temporaries (336.18G)' -> bytes; XLA's K, M,
  G are powers of 1024) when `error` is XLA's refusal of a program that does not fit."""
  message = str(error)
  signs = ('RESOURCE_EXHAUSTED', 'exceeds available', 'Ran out of memory')
  if not any(sign in message for sign in signs):
    return None
  named = {what: int(float(number) * _UNITS[unit])
           for what, number, unit in _NAMED_BYTES.findall(message)}
  return {'message': message.strip().splitlines()[0][:2000], 'bytes_named': named}


@contextlib.contextmanager
def _no_persistent_cache_writes():
  """An executable compiled for a topology without its devices cannot be loaded back from JAX's
  persistent compilation cache (no client to load it onto), so none is written there."""
  name = 'jax_persistent_cache_min_compile_time_secs'
  before = getattr(jax.config, name)
  jax.config.update(name, 1e12)
  try:
    yield
  finally:
    jax.config.update(name, before)


# ---- the report ------------------------------------------------------------------------------

def compile_report(config, topology: str, what: str = 'train', explicit: Collection[str] = (),
                   param_dtype: str = 'float32') -> dict[str, Any]:
  """Compiles `what` of `config` for `topology` and returns the report (module docstring)."""
  devices = topology_devices(topology)
  tgt = target(config, devices, what, explicit, param_dtype)
  hbm = hbm_per_device(topology, devices)
  n = len(devices)
  mesh_cfg = tgt.run.mesh
  report: dict[str, Any] = {
      'topology': topology, 'devices': n, 'device_kind': devices[0].device_kind,
      'devices_per_chip': devices_per_chip(devices), 'what': what,
      'mesh': {**dict(tgt.mesh.shape), 'fsdp': mesh_cfg.fsdp, 'devices_used': tgt.mesh.size},
      'batch': tgt.run.train.batch_size, 'seq_len': tgt.run.train.seq_len,
      'num_layers': tgt.run.model.num_layers, 'param_dtype': param_dtype,
      'fp8_weights': tgt.run.model.fp8_weights,
  }
  if tgt.cache:
    report['cache'] = tgt.cache
  start = time.perf_counter()
  try:
    with jax.set_mesh(tgt.mesh):  # the MoE layer reads the ambient mesh while tracing
      lowered = tgt.jitted.lower(*tgt.args)
    with _no_persistent_cache_writes():
      compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = out_of_memory(e)
    if oom is None:
      raise
    report.update(compile_s=round(time.perf_counter() - start, 2), fits=False,
                  hbm_bytes_per_device=hbm, error=oom['message'],
                  error_bytes=oom['bytes_named'])
    return report
  report['compile_s'] = round(time.perf_counter() - start, 2)
  mem = memory(compiled)
  peak, total = peak_bytes(compiled), total_bytes(mem)
  report.update(
      bytes_per_device=mem, peak_bytes_per_device=peak, total_bytes_per_device=total,
      hbm_bytes_per_device=hbm,
      fits=None if hbm is None else (peak if peak is not None else total) <= hbm,
      flops_per_device=flops_per_device(compiled),
      model_flops_per_device=tgt.model_flops / tgt.mesh.size,
      collectives=collectives(compiled.as_text()))
  return report


def _gib(x) -> str:
  return '-' if x is None else f'{x / GiB:,.3f} GiB'


def format_report(r: dict[str, Any]) -> str:
  """The report as a readable table."""
  mesh = r['mesh']
  lines = [f"{r['what']} step for {r['topology']}: {r['devices']} x {r['device_kind']} "
           f"({r['devices_per_chip']} per chip), mesh data {mesh['data']} x expert "
           f"{mesh['expert']} x plane {mesh['plane']}{' + FSDP' if mesh['fsdp'] else ''}, "
           f"batch {r['batch']} x {r['seq_len']}, {r['num_layers']} layers",
           f"  compile            {r['compile_s']:.1f} s"]
  if r.get('cache'):
    lines.append(f"  cache              {r['cache']}")
  if 'error' in r:
    lines += [f"  fits               False (XLA refused the program)",
              f"  HBM per device     {_gib(r['hbm_bytes_per_device'])}",
              f"  XLA                {r['error']}"]
    lines += [f"    {name + ':':<22}{_gib(b)}" for name, b in r['error_bytes'].items()]
    return '\n'.join(lines)
  lines.append('  per device:')
  lines += [f"    {name:<16} {_gib(b)}" for name, b in r['bytes_per_device'].items() if b or
            not name.startswith('host')]
  lines += [f"    {'total':<16} {_gib(r['total_bytes_per_device'])}",
            f"    {'peak (XLA)':<16} {_gib(r['peak_bytes_per_device'])}",
            f"    {'HBM':<16} {_gib(r['hbm_bytes_per_device'])}",
            f"  fits               {r['fits']}"]
  flops = r['flops_per_device']
  lines.append(f"  FLOPs per device   XLA {flops if flops is None else f'{flops:.4g}'}, model "
               f"{r['model_flops_per_device']:.4g} (analysis/flops.py; XLA counts a loop body "
               "once)")
  lines.append('  collectives (optimized HLO, per device):')
  lines += [f"    {kind:<19}{c['count']:>5}  {c['bytes'] / 2**20:,.2f} MiB"
            for kind, c in r['collectives'].items()]
  return '\n'.join(lines)

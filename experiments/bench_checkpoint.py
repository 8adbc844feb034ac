"""Importing (and exporting) a Hugging Face checkpoint at scale: seconds, GB/s, peak host memory.

  python -m experiments.bench_checkpoint [--dir=/tmp/deepseek_jax_bench_checkpoint] [--gb=3]
                                         [--processes=1,2] [--keep] [--fp8]

Writes a synthetic checkpoint with DeepSeek-V2-Lite's widths and V3's router (random BF16, the
released tensor names, one file per ~1 GB) and as many layers as make about `--gb` GB, then imports it with
`convert.hf.load_pretrained` in P processes (one CPU device each, gloo between them) for each P of
`--processes`, onto the mesh data 1 x expert 1 x plane P: the routed experts split P ways, the rest
whole on every process, parameters in BFLOAT16 (the checkpoint's own bytes). Each process
reports its seconds and its peak resident memory above its resident memory just before the import
(the kernel's high-water mark, reset first), against the target (checkpoint bytes / P) x 1.3 +
the largest tensor. Then it exports the one-process import back (`convert.export`) and reports
the same. The files are read from the page cache (just written), so the figures are the
importer's and the exporter's own work, not the disk's. Prints a table, then one JSON line.

--fp8 writes the tensors DeepSeek-V3 releases in FP8 as E4M3 with 128x128 `weight_scale_inv`
(the rest BF16; `--gb` then counts those bytes) and imports with `keep_fp8=True`: the kept
weights stay the checkpoint's E4M3 bytes (no export: a kept model does not export).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

from absl import app, flags
import ml_dtypes
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.convert import export, hf, safetensors_io
from experiments.configs import deepseek_v2_lite

_DIR = flags.DEFINE_string('dir', '/tmp/deepseek_jax_bench_checkpoint', 'Scratch directory.')
_GB = flags.DEFINE_float('gb', 3.0, 'Approximate checkpoint size in GB (1e9 bytes).')
_PROCESSES = flags.DEFINE_list('processes', ['1', '2'], 'Process counts to import with.')
_KEEP = flags.DEFINE_bool('keep', False, 'Keep the checkpoint and the export afterwards.')
_FP8 = flags.DEFINE_bool('fp8', False, 'An FP8 checkpoint (as V3 is released), imported with '
                         'keep_fp8=True.')

SHARD_BYTES = 10**9
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of a released-layout checkpoint of `cfg` (name -> shape), in plan order."""
  plan, _ = hf.tensor_plan(cfg, set())
  return {name: shape for rule in plan for name, shape in rule.sources.items()}


def _nbytes(name: str, shape: tuple[int, ...], fp8: bool) -> int:
  """A tensor's bytes in the file: E4M3 plus its float32 scales, or BF16."""
  if fp8 and export.quantized(name, shape):
    return math.prod(shape) + 4 * math.prod(hf.scale_shape(shape, export.FP8_BLOCK))
  return 2 * math.prod(shape)


def bench_config(gb: float, fp8: bool = False) -> ModelConfig:
  """V2-Lite's widths with the number of layers whose tensors come closest to `gb` GB."""
  # V3's router (sigmoid with the bias; one more [E] tensor per layer), which HF's DeepseekV3
  # and so the export can express
  cfg = ModelConfig.from_dict(deepseek_v2_lite.get_config().model.to_dict()).replace(
      mtp_depth=0, scoring_func='sigmoid', use_router_bias=True, norm_topk_prob=True)
  size = lambda layers: sum(_nbytes(n, s, fp8) for n, s in _tensors(
      cfg.replace(num_layers=layers)).items())
  layers = min(range(cfg.first_k_dense + 1, cfg.num_layers + 1),
               key=lambda n: abs(size(n) - gb * 1e9))
  return cfg.replace(num_layers=layers)


def _random(name: str, shape: tuple[int, ...], fp8: bool, rng) -> dict[str, np.ndarray]:
  """One tensor ~ N(0, 0.02): BF16, or E4M3 with its `_scale_inv` (with `fp8`, where V3 is)."""
  w = 0.02 * rng.standard_normal(shape, np.float32)
  if fp8 and export.quantized(name, shape):
    values, scales = export.quantize_fp8(w)
    return {name: values, name + hf.SCALE_SUFFIX: scales}
  return {name: w.astype(ml_dtypes.bfloat16)}


def write_checkpoint(cfg: ModelConfig, directory: pathlib.Path, fp8: bool = False) -> dict:
  """Random tensors (std 0.02) in files of ~1 GB with an index; one file in memory at once."""
  directory.mkdir(parents=True)
  tensors = _tensors(cfg)
  files, current, size = [], [], 0
  for name, shape in tensors.items():
    nbytes = _nbytes(name, shape, fp8)
    if current and size + nbytes > SHARD_BYTES:
      files.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  files.append(current)
  rng = np.random.default_rng(0)
  weight_map, total = {}, 0
  for k, names in enumerate(files):
    file_name = f'model-{k + 1:05d}-of-{len(files):05d}.safetensors'
    arrays = {k: v for n in names for k, v in _random(n, tensors[n], fp8, rng).items()}
    safetensors_io.write_file(directory / file_name, arrays, {'format': 'pt'})
    total += sum(a.nbytes for a in arrays.values())
    weight_map.update({n: file_name for n in arrays})
    del arrays
  (directory / safetensors_io.INDEX_FILE).write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=1))
  (directory / 'config.json').write_text(json.dumps(export.hf_config(cfg, fp8), indent=1))
  largest = max(_nbytes(n, s, fp8) for n, s in tensors.items())
  return {'bytes': total, 'files': len(files), 'tensors': len(tensors), 'largest_tensor': largest,
          'layers': cfg.num_layers}


# ---- one importing (or exporting) process ---------------------------------------------------

def _memory() -> dict[str, int]:
  with open('/proc/self/status', encoding='ascii') as f:
    fields = dict(line.split(':', 1) for line in f)
  return {k: int(fields[k].split()[0]) * 1024 for k in ('VmRSS', 'VmHWM')}


def _reset_peak() -> bool:
  """Resets the kernel's resident high-water mark (VmHWM) to the current RSS, where allowed."""
  try:
    with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
      f.write('5')
    return True
  except OSError:
    return False


def worker(checkpoint: str, process: int, processes: int, address: str, export_to: str,
           keep_fp8: bool = False):
  """Runs in a child process: import (and, when `export_to`, export), then one JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(address, processes, process)
  from deepseek_jax import sharding  # pylint: disable=import-outside-toplevel
  jax.devices()
  mesh = sharding.make_mesh(1, 1, processes)  # routed experts over plane: P ways
  base, reset = _memory()['VmRSS'], _reset_peak()
  start = time.perf_counter()
  _, model = hf.load_pretrained(checkpoint, mesh=mesh, rules=sharding.rules(),
                                param_dtype=jnp.bfloat16, keep_fp8=keep_fp8)
  leaves = jax.tree.leaves(model)
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - start
  held = sum(s.data.nbytes for a in leaves for s in a.addressable_shards
             if s.replica_id == 0 or a.is_fully_replicated)
  report = {'process': process, 'import_s': seconds, 'held_bytes': held,
            'import_peak_above_base': _memory()['VmHWM'] - base, 'peak_reset': reset}
  if export_to:
    base, _ = _memory()['VmRSS'], _reset_peak()
    start = time.perf_counter()
    export.save_pretrained(model, export_to, max_shard_bytes=SHARD_BYTES, progress=False)
    report.update(export_s=time.perf_counter() - start,
                  export_peak_above_base=_memory()['VmHWM'] - base)
  print(json.dumps(report))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(checkpoint: pathlib.Path, processes: int, export_to: str = '',
                  keep_fp8: bool = False) -> list[dict]:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  address = f'127.0.0.1:{_free_port()}'
  code = ('import sys; from experiments import bench_checkpoint as b; '
          'b.worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], '
          'sys.argv[6] == "1")')
  children = [subprocess.Popen(
      [sys.executable, '-c', code, str(checkpoint), str(i), str(processes), address, export_to,
       str(int(keep_fp8))],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  reports = []
  for child in children:
    out, err = child.communicate()
    if child.returncode:
      raise RuntimeError(f'bench process failed:\n{err[-4000:]}')
    reports.append(json.loads(out.strip().splitlines()[-1]))
  return reports


def main(argv):
  del argv
  scratch = pathlib.Path(_DIR.value)
  if scratch.exists():
    shutil.rmtree(scratch)
  fp8 = _FP8.value
  cfg = bench_config(_GB.value, fp8)
  start = time.perf_counter()
  info = write_checkpoint(cfg, scratch / 'hf', fp8)
  info.update(write_s=time.perf_counter() - start, fp8=fp8)
  gb = info['bytes'] / 1e9
  print(f"checkpoint{' (FP8, imported kept)' if fp8 else ''}: V2-Lite widths, "
        f"{info['layers']} layers, {info['tensors']} tensors, "
        f"{gb:.2f} GB in {info['files']} files (largest tensor {info['largest_tensor'] / 1e9:.2f}"
        f" GB), written in {info['write_s']:.1f} s")
  rows = []
  for p in sorted(int(p) for p in _PROCESSES.value):
    export_to = str(scratch / 'export') if p == 1 and not fp8 else ''
    reports = run_processes(scratch / 'hf', p, export_to, fp8)
    target = info['bytes'] / p * 1.3 + info['largest_tensor']
    seconds = max(r['import_s'] for r in reports)
    for r in reports:
      rows.append(dict(r, processes=p, target_bytes=target,
                       import_gb_per_s=gb / seconds,
                       within_target=r['import_peak_above_base'] <= target))
      print(f"import, {p} process(es), process {r['process']}: {r['import_s']:.1f} s "
            f"({gb / seconds:.2f} GB/s of checkpoint), holds {r['held_bytes'] / 1e9:.2f} GB, "
            f"peak {r['import_peak_above_base'] / 1e9:.2f} GB above its base "
            f"(target {target / 1e9:.2f} GB: {'met' if rows[-1]['within_target'] else 'MISSED'})")
      if 'export_s' in r:
        export_target = info['bytes'] * 1.3 + info['largest_tensor']
        print(f"export, 1 process: {r['export_s']:.1f} s ({gb / r['export_s']:.2f} GB/s), peak "
              f"{r['export_peak_above_base'] / 1e9:.2f} GB above its base after the import "
              f"(one shard file is {SHARD_BYTES / 1e9:.0f} GB at most)")
        rows[-1]['export_target_bytes'] = export_target
  if not _KEEP.value:
    shutil.rmtree(scratch)
  print(json.dumps({'checkpoint': info, 'runs': rows}))


if __name__ == '__main__':
  app.run(main)

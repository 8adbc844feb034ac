"""The Pallas kernels against their XLA paths: latent-attention decode and the FP8 block-scaled GEMM.

On a GPU (the issue's shapes):
  mla_decode  BF16, B = 128, S = 4096, N = 128, C = 512, R = 64, Tq = 1 and 2, every sequence
              at full length: effective GB/s (cache + queries + outputs read or written once)
              and TFLOP/s, for `kernels.mla_decode` and the XLA einsum path (BF16 operands,
              FP32 scores, as `layers.attention.absorbed` computes them);
  fp8_matmul  M = N = K = 4096 and 8192 and DeepSeek-V3 shapes (M = 4096; N = 7168, K = 2048 and
              N = 2048, K = 7168): TFLOP/s of `kernels.fp8_matmul`, of the XLA block-scaled path
              (`deepseek_jax.fp8`, one FP8 GEMM per 128-wide K block), of XLA's own FP8 dot (one
              scale per tensor) and of a BF16 dot.
On a TPU (the Mosaic kernels, picked by the platform): mla_decode at DeepSeek-V3's decode shape
(B = 64, S = 4096, N = 128, C = 512, R = 64, Tq = 1 and 2) and the same GEMMs; on a TPU7x the
FP8 GEMM runs twice, with FP8 tiles into the MXU and widened to BF16.
On a CPU it runs the same code at tiny shapes in Pallas interpret mode: a smoke test whose
figures mean nothing. One JSON line per measurement; `--out` also writes them to a file.

`--tpu_compile=v5e:2x2,v5p:2x2x1,v6e:2x2,tpu7x:2x2x1` instead compiles both Mosaic kernels ahead
of time for one chip of each topology at V3's shapes (needs libtpu; run with JAX_PLATFORMS=cpu
TPU_SKIP_MDS_QUERY=1 on a machine without TPUs) and prints the compile seconds and the VMEM a
program holds, as computed from its block shapes.

  python -m experiments.bench_kernels [--out=bench_kernels.jsonl] [--repeats=20]
  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python -m experiments.bench_kernels \
      --tpu_compile=v5e:2x2,v5p:2x2x1,v6e:2x2,tpu7x:2x2x1
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from deepseek_jax import fp8
from kernels import fp8_matmul as fp8_kernel
from kernels import fp8_matmul_tpu
from kernels import mla_decode as mla_kernel
from kernels import mla_decode_tpu
from kernels import reference

_OUT = flags.DEFINE_string('out', None, 'Also write the JSON lines to this file.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per measurement (the median is kept).')
_SMALL = flags.DEFINE_bool('small', None, 'Tiny shapes; default: on CPU only.')
_TPU_COMPILE = flags.DEFINE_list('tpu_compile', None, 'Only compile the Mosaic kernels ahead of '
                                 'time for these TPU topologies (e.g. v5e:2x2) and report.')

GPU_MLA = dict(B=128, S=4096, N=128, C=512, R=64)
TPU_MLA = dict(B=64, S=4096, N=128, C=512, R=64)  # DeepSeek-V3's decode shape (issue 19)
SMALL_MLA = dict(B=2, S=256, N=16, C=64, R=16)
GPU_GEMMS = [(4096, 4096, 4096), (8192, 8192, 8192), (4096, 7168, 2048), (4096, 2048, 7168)]
SMALL_GEMMS = [(256, 256, 256), (200, 300, 260)]  # (M, N, K); the second is padded


def sig(x: float) -> float:
  return float(f'{x:.3g}')


def max_rel_diff(x, y) -> float:
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  return sig(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))))


def median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def xla_mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, scale):
  """The XLA path's arithmetic: BF16 operands, FP32 scores and softmax, BF16 probabilities."""
  f32 = jnp.float32
  Tq = q_latent.shape[1]
  scores = (jnp.einsum('BTNC,BSC->BTNS', q_latent, c_kv, preferred_element_type=f32)
            + jnp.einsum('BTNR,BSR->BTNS', q_rope, k_rope, preferred_element_type=f32)) * scale
  seen = jnp.arange(c_kv.shape[1])[None, None, :] < reference.visible(lengths, Tq)[:, :, None]
  probs = jax.nn.softmax(jnp.where(seen[:, :, None, :], scores, -jnp.inf), axis=-1)
  return jnp.einsum('BTNS,BSC->BTNC', probs.astype(c_kv.dtype), c_kv,
                    preferred_element_type=f32).astype(q_latent.dtype)


def bench_mla(shape: dict, Tq: int, emit) -> None:
  B, S, N, C, R = (shape[k] for k in 'BSNCR')
  dt = jnp.bfloat16
  keys = jax.random.split(jax.random.key(0), 4)
  q_latent = jax.random.normal(keys[0], (B, Tq, N, C), dt)
  q_rope = jax.random.normal(keys[1], (B, Tq, N, R), dt)
  c_kv = jax.random.normal(keys[2], (B, S, C), dt)
  k_rope = jax.random.normal(keys[3], (B, S, R), dt)
  lengths = jnp.full((B,), S, jnp.int32)
  scale = (C + R) ** -0.5
  itemsize = 2
  bytes_moved = (B * S * (C + R) + 2 * B * Tq * N * C + B * Tq * N * R) * itemsize
  flops = 2 * B * Tq * N * S * (C + R) + 2 * B * Tq * N * S * C
  paths = {
      'pallas': jax.jit(lambda *a: mla_kernel.mla_decode(*a, scale)[0]),
      'xla': jax.jit(functools.partial(xla_mla_decode, scale=scale)),
  }
  args = (q_latent, q_rope, c_kv, k_rope, lengths)
  xla_out = paths['xla'](*args)
  for name, fn in paths.items():
    seconds = median_seconds(fn, *args)
    emit(dict(kernel='mla_decode', path=name, dtype='bfloat16', Tq=Tq, **shape,
              us=sig(seconds * 1e6), GB_per_s=sig(bytes_moved / seconds / 1e9),
              TFLOP_per_s=sig(flops / seconds / 1e12),
              max_rel_diff_vs_xla=max_rel_diff(fn(*args), xla_out)))


def per_tensor_fp8(a, b):
  """XLA's own FP8 GEMM: one scale per operand (the scaled-dot pattern cuBLASLt takes)."""
  sa = jnp.max(jnp.abs(a)) / fp8.E4M3_MAX
  sb = jnp.max(jnp.abs(b)) / fp8.E4M3_MAX
  return jnp.dot((a / sa).astype(fp8.FP8), (b / sb).astype(fp8.FP8),
                 preferred_element_type=jnp.float32).astype(jnp.bfloat16) * (sa * sb)


def bench_fp8(M: int, N: int, K: int, emit, native_fp8: bool | None = None) -> None:
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (M, K), jnp.float32)
  b = jax.random.normal(kb, (K, N), jnp.float32) * K ** -0.5
  a_values, a_scales = fp8.quantize(a, fp8.ACT_BLOCK)
  b_values, b_scales = fp8.quantize(b, fp8.WEIGHT_BLOCK)
  quantized = (a_values, a_scales, b_values, b_scales)
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  paths = {
      'pallas': (jax.jit(lambda *q: fp8_kernel.fp8_matmul(*q, out_dtype=jnp.bfloat16,
                                                          native_fp8=native_fp8)), quantized),
      'xla_block_scaled': (jax.jit(lambda *q: reference.fp8_matmul(*q, jnp.bfloat16)),
                           quantized),
      'xla_fp8_per_tensor': (jax.jit(per_tensor_fp8), (a16, b16)),
      'xla_bf16': (jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)
                           .astype(jnp.bfloat16)), (a16, b16)),
  }
  exact = a @ b  # float32 operands: how far each path is from the unquantized product
  for name, (fn, args) in paths.items():
    seconds = median_seconds(fn, *args)
    out = fn(*args)
    emit(dict(kernel='fp8_matmul', path=name, M=M, N=N, K=K, native_fp8=native_fp8,
              us=sig(seconds * 1e6),
              TFLOP_per_s=sig(2 * M * N * K / seconds / 1e12),
              max_rel_diff_vs_xla_block_scaled=max_rel_diff(out, paths['xla_block_scaled'][0](
                  *quantized)),
              max_rel_diff_vs_float32=max_rel_diff(out, exact)))


def compile_for_tpu(topologies: list[str], emit) -> None:
  """AOT-compile both Mosaic kernels for one chip of each topology at V3's shapes."""
  from jax.experimental import topologies as topo_lib
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  B, S, N, C, R = (TPU_MLA[k] for k in 'BSNCR')
  M, Ng, K = GPU_GEMMS[2]  # M 4096, N 7168, K 2048
  for name in topologies:
    devices = topo_lib.get_topology_desc(topology_name=name, platform='tpu').devices
    sharding = NamedSharding(Mesh(devices[:1], ('chip',)), PartitionSpec())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    bf16, i32 = jnp.bfloat16, jnp.int32
    for Tq in (1, 2):
      for paged in (False, True):
        pages = S // mla_kernel.BLOCK_S
        cache = ((B * pages, mla_kernel.BLOCK_S), (B * pages, mla_kernel.BLOCK_S)) if paged else (
            (B, S), (B, S))
        args = [sds((B, Tq, N, C), bf16), sds((B, Tq, N, R), bf16), sds((*cache[0], C), bf16),
                sds((*cache[1], R), bf16), sds((B,), i32)] + ([sds((B, pages), i32)] if paged
                                                              else [])
        fn = (lambda q, qr, c, kr, L, t: mla_kernel.mla_decode(q, qr, c, kr, L, 0.1,
                                                              block_table=t)) if paged else (
            lambda q, qr, c, kr, L: mla_kernel.mla_decode(q, qr, c, kr, L, 0.1))
        rows, _, block_s, _ = mla_decode_tpu.block_sizes(
            Tq * N, mla_kernel.BLOCK_S if paged else S)
        seconds = _compile_seconds(fn, args)
        emit(dict(kernel='mla_decode', path='mosaic_tpu', topology=name, Tq=Tq, paged=paged,
                  B=B, S=S, N=N, C=C, R=R, compile_s=sig(seconds), block_rows=rows,
                  block_s=block_s, vmem_bytes_per_program=mla_decode_tpu.vmem_bytes(
                      rows, block_s, C, R, 2)))
    for native in (False, True):
      args = [sds((M, K), fp8.FP8), sds((M, K // 128), jnp.float32), sds((K, Ng), fp8.FP8),
              sds((K // 128, Ng // 128), jnp.float32)]
      fn = lambda *q, native=native: fp8_kernel.fp8_matmul(*q, out_dtype=jnp.bfloat16,
                                                           native_fp8=native)
      bm, bn, bk = fp8_matmul_tpu.block_sizes(M, Ng, K, None, None, None)
      seconds = _compile_seconds(fn, args)
      emit(dict(kernel='fp8_matmul', path='mosaic_tpu', topology=name, native_fp8=native, M=M,
                N=Ng, K=K, compile_s=sig(seconds), block_m=bm, block_n=bn, block_k=bk,
                vmem_bytes_per_program=fp8_matmul_tpu.vmem_bytes(bm, bn, bk, K, 2, native)))


def _compile_seconds(fn, args) -> float:
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  if 'tpu_custom_call' not in lowered.as_text():
    raise RuntimeError('the Mosaic kernel is not in the lowered module')
  lowered.compile()
  return time.perf_counter() - start


def main(argv):
  del argv
  lines = []
  backend = jax.default_backend()

  def emit(row):
    run = {} if _TPU_COMPILE.value else dict(interpret=backend == 'cpu')  # compiled, not run
    row = dict(device=jax.devices()[0].device_kind, **run, **row)
    lines.append(json.dumps(row))
    print(lines[-1], flush=True)

  if _TPU_COMPILE.value:
    compile_for_tpu(_TPU_COMPILE.value, emit)
  else:
    small = _SMALL.value if _SMALL.value is not None else backend == 'cpu'
    mla_shape = SMALL_MLA if small else TPU_MLA if backend == 'tpu' else GPU_MLA
    for Tq in (1, 2):
      bench_mla(mla_shape, Tq, emit)
    native = (False, True) if backend == 'tpu' and fp8_matmul_tpu.has_native_fp8() else (None,)
    for M, N, K in SMALL_GEMMS if small else GPU_GEMMS:
      for native_fp8 in native:
        bench_fp8(M, N, K, emit, native_fp8)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  app.run(main)

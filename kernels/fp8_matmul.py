"""Block-scaled FP8 GEMM as a Pallas kernel (V3 report §3.3): `fp8_matmul(a, a_s, b, b_s)`, which
runs this module's Triton-layout kernel on GPUs (and, interpreted, on CPU) and
`kernels/fp8_matmul_tpu.py`'s Mosaic-layout kernel on TPUs (`backend`, `kernels.platform`).

Letters (deepseek_jax/DESIGN.md), as in `deepseek_jax.fp8.matmul`: Z rows, I contraction,
O columns, Ib = ceil(I / 128) I blocks, i one of them.
  a  [Z, I] float8_e4m3fn, a_scales [Z, Ib] float32: one scale per row per 128-wide I block
     (the 1x128 activation tiles; per-row scales also cover the wgrad GEMM's x^T);
  b  [I, O] float8_e4m3fn, b_scales [Ib, ceil(O/128)] (128x128 weight blocks) or [Ib, O]
     (128x1 tiles, the wgrad GEMM's dy) float32;
  out[z, o] = sum_i (a[z, block i] . b[block i, o]) * a_scales[z, i] * b_scales[i, o].

Design (Triton-style): the grid is (Zp / block_m, Op / block_n), one output tile per
program. Each program's a and b blocks cover the whole (padded) I extent of its tile, and a
`lax.fori_loop` over the Ib blocks slices them with `pl.ds`: per step one FP8 x FP8 tile product
[block_m, 128] . [128, block_n] accumulated in FP32 (`jnp.dot(..., preferred_element_type=f32)`),
multiplied by a's per-row scales of that block [block_m] and b's per-column scales [block_n], and
added to an FP32 accumulator in registers: the report's promotion to CUDA cores every
N_C = 128 elements. Inside the kernel b is always scaled per column: 128x128 blocks are repeated
over their 128 columns in the wrapper (exact), so one kernel serves all three GEMMs of the FP8
linear layer. Scales are passed transposed, a_scales as [Ib, Z], so that step i loads one
contiguous row of each scale array. Z, O and I that are not multiples of the tiles are
zero-padded in the wrapper (zero values add nothing, whatever the padded scales) and the output
is sliced back, so the kernel itself sees only static, power-of-two tile shapes.

What was run: interpret mode on CPU (tests/test_kernels_fp8.py, against the plain-jnp
reference `kernels/reference.py::fp8_matmul` and a float64 numpy sum) and lowering for CUDA
through Pallas Triton at V3's shapes (tests/test_kernels_lowering.py; Triton's compiler
parameters are always passed, as JAX 0.10 sends a GPU pallas_call without them to Mosaic GPU).
No PTX was built and nothing ran on an H100/H200. The kernel keeps to what the Triton lowering
takes: every loaded array has a power-of-two size (block_m, block_n >= 16 powers of two, 128-wide
I steps, scale rows of block_m / block_n), the loop bound is static, and the dot is a 2-D FP8 x
FP8 dot with FP32 result (Triton lowers it to FP8 MMA/WGMMA on compute capability >= 8.9).
Pallas emits the dot with Triton's default `max_num_imprecise_acc` = 0, i.e. the tensor cores'
own accumulator over the 128-wide step, which is what the report describes; the FP32 promotion
is the explicit add per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels import fp8_matmul_tpu, platform, tiles

FP8 = jnp.float8_e4m3fn
BLOCK_K = 128  # N_C: I elements per FP8 partial product before promotion to FP32
OUT_DTYPES = (jnp.float32, jnp.bfloat16)


def fp8_matmul(a_values: jax.Array, a_scales: jax.Array, b_values: jax.Array,
               b_scales: jax.Array, out_dtype=jnp.float32, *, backend: str | None = None,
               block_m: int | None = None, block_n: int | None = None,
               block_k: int | None = None, interpret: bool | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               native_fp8: bool | None = None) -> jax.Array:
  """E4M3 a [Z, I] . E4M3 b [I, O] -> [Z, O] out_dtype (float32 or bfloat16), block-scaled.

  a_scales [Z, ceil(I/128)]; b_scales [ceil(I/128), ceil(O/128)] (128x128 blocks) or
  [ceil(I/128), O] (one per column of each I block); both float32.
  backend: 'triton' (this module's kernel), 'mosaic_tpu' (`kernels/fp8_matmul_tpu.py`) or None,
  picked by the platform being lowered for (Mosaic on TPU, Triton elsewhere; `kernels.platform`).
  interpret: None compiles, except on CPU, where it runs in interpret mode (the generic
  interpreter for Triton, Pallas' TPU interpret mode for Mosaic); True / False force it.
  Tiles: Triton takes block_m (None: the smallest power of two >= Z, clipped to [16, 64]) and
  block_n (None: 128), powers of two >= 16, and `num_warps` / `num_stages` (None: Pallas'
  defaults); Mosaic takes block_m (a multiple of 32), block_n and block_k (multiples of 128;
  defaults in `fp8_matmul_tpu.block_sizes`) and `native_fp8` (None: on a TPU7x host).
  All arguments but the arrays are static: jit with them fixed, e.g.
  `jax.jit(functools.partial(fp8_matmul, block_m=64, block_n=128))`.
  """
  M, K, N, b_per_block = _check(a_values, a_scales, b_values, b_scales, out_dtype)
  platform.check_backend(backend, 'fp8_matmul')
  if backend != 'mosaic_tpu':
    _triton_blocks(M, block_m, block_n)  # fail early, naming the tile
  if backend != 'triton':
    fp8_matmul_tpu.block_sizes(M, N, K, block_m, block_n, block_k)
  if b_per_block:  # 128x128 blocks -> per column, exact: each scale repeated over its columns
    b_scales = jnp.repeat(b_scales, BLOCK_K, axis=1)[:, :N]
  args = (a_values, a_scales, b_values, b_scales, jnp.dtype(out_dtype))
  triton = functools.partial(_triton, *args, block_m=block_m, block_n=block_n,
                             num_warps=num_warps, num_stages=num_stages)
  mosaic = functools.partial(fp8_matmul_tpu.matmul, *args, block_m=block_m, block_n=block_n,
                             block_k=block_k, native_fp8=native_fp8)
  return platform.dispatch(backend, interpret, triton, mosaic)


def _triton_blocks(M: int, block_m: int | None, block_n: int | None) -> tuple[int, int]:
  block_m = _default_block_m(M) if block_m is None else block_m
  block_n = 128 if block_n is None else block_n
  for name, size in (('block_m', block_m), ('block_n', block_n)):
    if size < 16 or size & (size - 1):
      raise ValueError(f'fp8_matmul: {name}={size} must be a power of two >= 16')
  return block_m, block_n


def _triton(a_values, a_scales, b_values, b_scales, out_dtype, *, block_m, block_n, num_warps,
            num_stages, interpret):
  """This module's kernel on padded tiles: a [Zp, Ip], a_scales^T [Ib, Zp], b [Ip, Op],
  b_scales [Ib, Op] (per column)."""
  M, K = a_values.shape
  N = b_values.shape[1]
  block_m, block_n = _triton_blocks(M, block_m, block_n)
  Kb = -(-K // BLOCK_K)
  Mp, Np, Kp = tiles.round_up(M, block_m), tiles.round_up(N, block_n), Kb * BLOCK_K
  a_values = tiles.pad_to(a_values, (Mp, Kp))
  b_values = tiles.pad_to(b_values, (Kp, Np))
  a_scales = tiles.pad_to(a_scales.T, (Kb, Mp))  # [Ib, Z]: step i reads one contiguous row
  b_scales = tiles.pad_to(b_scales, (Kb, Np))
  out = pl.pallas_call(
      functools.partial(_kernel, num_k_blocks=Kb),
      out_shape=tiles.out_struct((Mp, Np), out_dtype, a_values, a_scales, b_values, b_scales),
      grid=(Mp // block_m, Np // block_n),
      in_specs=[
          pl.BlockSpec((block_m, Kp), lambda i, j: (i, 0)),  # a: the tile's rows, all of I
          pl.BlockSpec((Kb, block_m), lambda i, j: (0, i)),  # a_scales^T
          pl.BlockSpec((Kp, block_n), lambda i, j: (0, j)),  # b: all of I, the tile's columns
          pl.BlockSpec((Kb, block_n), lambda i, j: (0, j)),  # b_scales
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      interpret=interpret,
      # Explicitly Triton: since JAX 0.10 a GPU pallas_call without compiler parameters is
      # lowered by Mosaic GPU, for which this kernel was not written.
      compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=num_warps,
                                                                      num_stages=num_stages),
      name='fp8_matmul',
  )(a_values, a_scales, b_values, b_scales)
  return out[:M, :N] if (Mp, Np) != (M, N) else out


def _kernel(a_ref, a_scales_ref, b_ref, b_scales_ref, out_ref, *, num_k_blocks):
  """One output tile: a_ref [bm, Ip], a_scales_ref [Ib, bm], b_ref [Ip, bn],
  b_scales_ref [Ib, bn] -> out_ref [bm, bn]."""
  block_m, block_n = out_ref.shape

  def add_block(kb, acc):
    k = pl.ds(pl.multiple_of(kb * BLOCK_K, BLOCK_K), BLOCK_K)
    partial = jnp.dot(a_ref[:, k], b_ref[k, :],
                      preferred_element_type=jnp.float32)  # [bm, 128] . [128, bn], FP8 MMA
    a_s = a_scales_ref[kb, :]  # [bm]
    b_s = b_scales_ref[kb, :]  # [bn]
    # Promotion: scale the FP32 partial product and add it in FP32, in the reference's order.
    return acc + partial * a_s[:, None] * b_s[None, :]

  acc = jax.lax.fori_loop(0, num_k_blocks, add_block,
                          jnp.zeros((block_m, block_n), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _check(a_values, a_scales, b_values, b_scales, out_dtype):
  """Shapes and dtypes of `fp8_matmul`'s operands -> (Z, I, O, b_scales per 128x128 block)."""
  if a_values.ndim != 2 or b_values.ndim != 2:
    raise ValueError(f'fp8_matmul: a {a_values.shape} and b {b_values.shape} must be 2-D')
  M, K = a_values.shape
  K2, N = b_values.shape
  if K != K2:
    raise ValueError(f'fp8_matmul: contraction dims differ, a {a_values.shape}, '
                     f'b {b_values.shape}')
  for name, x in (('a_values', a_values), ('b_values', b_values)):
    if x.dtype != FP8:
      raise ValueError(f'fp8_matmul: {name} has dtype {x.dtype}, expected float8_e4m3fn')
  for name, x in (('a_scales', a_scales), ('b_scales', b_scales)):
    if x.dtype != jnp.float32:
      raise ValueError(f'fp8_matmul: {name} has dtype {x.dtype}, expected float32')
  if jnp.dtype(out_dtype) not in OUT_DTYPES:
    raise ValueError(f'fp8_matmul: out_dtype {jnp.dtype(out_dtype)}, expected float32 or '
                     'bfloat16')
  Kb, Nb = -(-K // BLOCK_K), -(-N // BLOCK_K)
  if a_scales.shape != (M, Kb):
    raise ValueError(f'fp8_matmul: a_scales {a_scales.shape} is not per 1x{BLOCK_K} tile of '
                     f'a {a_values.shape}: expected {(M, Kb)}')
  if b_scales.shape not in ((Kb, Nb), (Kb, N)):
    raise ValueError(f'fp8_matmul: b_scales {b_scales.shape} is neither per {BLOCK_K}x{BLOCK_K} '
                     f'block nor per {BLOCK_K}x1 tile of b {b_values.shape}: expected '
                     f'{(Kb, Nb)} or {(Kb, N)}')
  return M, K, N, b_scales.shape[1] != N


def _default_block_m(M: int) -> int:
  return min(64, max(16, 1 << (M - 1).bit_length()))

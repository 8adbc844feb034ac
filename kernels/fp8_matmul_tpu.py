"""Block-scaled FP8 GEMM in Mosaic's layout (Pallas TPU), behind
`kernels.fp8_matmul.fp8_matmul(..., backend='mosaic_tpu')`.

Same operands and sum as `kernels/fp8_matmul.py` (letters as in deepseek_jax/DESIGN.md: Z rows,
I contraction, O columns, Ib = I / 128 blocks, i one of them): E4M3 a [Z, I] with per-row scales
of each 128-wide I block, E4M3 b [I, O] with per-column scales of each I block,
out = sum_i (a_i . b_i) a_s[:, i] b_s[i, :].

Layout (the usual TPU tiled matmul): grid (Z / block_m, O / block_n, I / block_k), I last and
'arbitrary', an FP32 accumulator in VMEM scratch across it. The FP8 operands stay FP8 in HBM and
are DMA'd into VMEM as FP8 tiles (a weight costs half BF16's HBM bytes). Each grid step splits
its [block_m, block_k] x [block_k, block_n] tiles into 128-wide I blocks and, per block, takes one
product with FP32 result, multiplies it by a's scales [block_m, 1] and b's [1, block_n] of that
block and adds it to the accumulator: V3's promotion every N_C = 128.

The product: TPUs before the seventh generation (v5e, v5p, v6e) have no FP8 in the MXU, so the
tiles are widened to BF16 in VMEM (E4M3 -> BF16 is exact) and multiplied as BF16 with FP32
accumulation. TPU7x (Ironwood) has FP8 in hardware ("TPU7x supports built-in hardware
acceleration for FP8 data types", Google Cloud's "TPU7x (Ironwood) performance optimizations"
guide, docs.cloud.google.com/tpu/docs/ironwood-performance), so with `native_fp8` the dot takes
the FP8 tiles directly. Both forms compile for all four generations here; which is faster on each
has not been measured.

Scales: a's are passed [Z, Ib] with the whole Ib in each block (Ib is the block's full minor
dimension, which Mosaic's (8, 128) rule allows), and step's column is picked with a one-hot
select and a lane sum (no dynamic lane slice). b's are [Ib, O] (128x128 blocks repeated over
their columns by the caller), their row read with a dynamic sublane slice.

What ran: TPU interpret mode on CPU (tests/test_kernels_tpu.py) and ahead-of-time compilation
through libtpu for v5e, v5p, v6e and tpu7x (tests/test_kernels_lowering.py). Not run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import tiles

BLOCK_K = 128  # N_C
FP8_ROWS = 32  # an 8-bit tile is (32, 128)
NATIVE_FP8_KINDS = ('TPU7x',)  # device_kind prefixes with FP8 in the MXU (see the docstring)


def block_sizes(M: int, N: int, K: int, block_m: int | None, block_n: int | None,
                block_k: int | None) -> tuple[int, int, int]:
  """Defaults: block_m the rows rounded to 32 up to 512, block_n 512, block_k 512 (narrower for
  small O or I). block_m a multiple of 32, block_n and block_k multiples of 128."""
  if block_m is None:
    block_m = min(512, tiles.round_up(M, FP8_ROWS))
  if block_n is None:
    block_n = min(512, tiles.round_up(N, 128))
  if block_k is None:
    block_k = min(512, tiles.round_up(K, BLOCK_K))
  for name, size, unit in (('block_m', block_m, FP8_ROWS), ('block_n', block_n, 128),
                           ('block_k', block_k, BLOCK_K)):
    if size < unit or size % unit:
      raise ValueError(f'fp8_matmul (mosaic_tpu): {name}={size} must be a multiple of {unit}')
  return block_m, block_n, block_k


def has_native_fp8(device_kind: str | None = None) -> bool:
  """Whether a TPU generation multiplies FP8 in its MXU (default: the first local device)."""
  if device_kind is None:
    device = jax.devices()[0]
    if device.platform != 'tpu':
      return False
    device_kind = device.device_kind
  return device_kind.startswith(NATIVE_FP8_KINDS)


def matmul(a_values: jax.Array, a_scales: jax.Array, b_values: jax.Array, b_scales: jax.Array,
           out_dtype, *, block_m: int | None = None, block_n: int | None = None,
           block_k: int | None = None, native_fp8: bool | None = None,
           interpret: bool = False) -> jax.Array:
  """a [Z, I] E4M3, a_scales [Z, Ib] f32, b [I, O] E4M3, b_scales [Ib, O] f32 (per column)
  -> [Z, O] out_dtype. Pads to whole tiles (zeros add nothing) and slices the result back."""
  M, K = a_values.shape
  N = b_values.shape[1]
  block_m, block_n, block_k = block_sizes(M, N, K, block_m, block_n, block_k)
  if native_fp8 is None:
    native_fp8 = has_native_fp8()
  Mp, Np = tiles.round_up(M, block_m), tiles.round_up(N, block_n)
  Kp = tiles.round_up(K, block_k)
  Kbp = Kp // BLOCK_K
  a_values = tiles.pad_to(a_values, (Mp, Kp))
  b_values = tiles.pad_to(b_values, (Kp, Np))
  a_scales = tiles.pad_to(a_scales, (Mp, Kbp))
  b_scales = tiles.pad_to(b_scales, (Kbp, Np))
  out = pl.pallas_call(
      functools.partial(_kernel, native_fp8=native_fp8),
      out_shape=tiles.out_struct((Mp, Np), out_dtype, a_values, a_scales, b_values, b_scales),
      grid=(Mp // block_m, Np // block_n, Kp // block_k),
      in_specs=[
          pl.BlockSpec((block_m, block_k), lambda i, j, k: (i, k)),  # a tile, FP8
          pl.BlockSpec((block_m, Kbp), lambda i, j, k: (i, 0)),      # a scales, every I block
          pl.BlockSpec((block_k, block_n), lambda i, j, k: (k, j)),  # b tile, FP8
          pl.BlockSpec((Kbp, block_n), lambda i, j, k: (0, j)),      # b scales, every I block
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=_interpret_mode(interpret),
      name='fp8_matmul_tpu',
  )(a_values, a_scales, b_values, b_scales)
  return out[:M, :N] if (Mp, Np) != (M, N) else out


def _interpret_mode(interpret):
  """True: Pallas' TPU interpret mode; 'generic': its generic interpreter; False: compiled."""
  return pltpu.InterpretParams() if interpret is True else interpret == 'generic'


def vmem_bytes(block_m: int, block_n: int, block_k: int, K: int, out_itemsize: int,
               native_fp8: bool = False) -> int:
  """VMEM one program holds, from its block shapes: double-buffered FP8 tiles, scales (lanes
  padded to 128) and output, the FP32 accumulator, BF16 copies of the tiles (unless native) and
  one FP32 partial product."""
  Kbp = tiles.round_up(K, block_k) // BLOCK_K
  tiles = block_m * block_k + block_k * block_n
  scales = (block_m * tiles.round_up(Kbp, 128) + tiles.round_up(Kbp, 8) * block_n) * 4
  pipelined = 2 * (tiles + scales + block_m * block_n * out_itemsize)
  widened = 0 if native_fp8 else 2 * tiles
  return pipelined + widened + 2 * block_m * block_n * 4


def _kernel(a_ref, a_scales_ref, b_ref, b_scales_ref, out_ref, acc_ref, *, native_fp8: bool):
  """One (row tile, column tile, I step): a [bm, bk], a_scales [bm, Ib], b [bk, bn],
  b_scales [Ib, bn] -> acc [bm, bn]; out written at the last I step."""
  k = pl.program_id(2)
  block_m, block_k = a_ref.shape
  sub_blocks = block_k // BLOCK_K

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  a, b = a_ref[...], b_ref[...]
  if not native_fp8:  # no FP8 in the MXU: widen in VMEM, exactly
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  a_scales = a_scales_ref[...]  # [bm, Ib]
  lane = jax.lax.broadcasted_iota(jnp.int32, a_scales.shape, 1)
  acc = acc_ref[...]
  for u in range(sub_blocks):  # static: the 128-wide I blocks of this step
    kb = k * sub_blocks + u
    cols = slice(u * BLOCK_K, (u + 1) * BLOCK_K)
    partial = jnp.dot(a[:, cols], b[cols, :], preferred_element_type=jnp.float32)
    a_s = jnp.sum(jnp.where(lane == kb, a_scales, 0.0), axis=1, keepdims=True)  # [bm, 1]
    b_s = b_scales_ref[pl.ds(kb, 1), :]  # [1, bn]
    acc = acc + partial * a_s * b_s  # promotion: scale in FP32, add in FP32
  acc_ref[...] = acc

  @pl.when(k == pl.num_programs(2) - 1)
  def _finish():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)

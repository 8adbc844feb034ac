"""Block-scaled E4M3 quantization (V3 report §3.3, "fine-grained quantization").

A tensor is cut into tiles over its last two dims (`block = (rows, cols)`), and each tile gets one
online scale, scale = amax(tile) / 448, so that its largest entry lands on E4M3's largest value:
  activations: 1 x 128 tiles along the contraction dim  -> block (1, 128)
  weights:     128 x 128 blocks                         -> block (128, 128)
  wgrad:       activations / output grads re-tiled 128 x 1 along tokens -> block (128, 1)
`pow2_scale=True` rounds every scale up to a power of two (UE8M0, as DeepSeek-V3.1 uses), so
dividing by it is exact and nothing can overflow. Shapes that are not multiples of the block are
padded with zeros inside (zeros do not change any amax); `values` keep the input's shape, and
`scales` have shape [..., ceil(rows / block_rows), ceil(cols / block_cols)].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn; anything above converts to NaN, so we clip

ACT_BLOCK = (1, 128)      # activations, tiles along the contraction dim
WEIGHT_BLOCK = (128, 128)  # weights
TOKEN_BLOCK = (128, 1)    # activations / output grads for the weight-gradient GEMM
KEPT_BLOCK = (128, 1)     # weights kept in E4M3 (`QuantizedWeight`): a scale per column of 128 rows


def num_blocks(size: int, block: int) -> int:
  return -(-size // block)


def quantize(x: jax.Array, block: tuple[int, int], *,
             pow2_scale: bool = False) -> tuple[jax.Array, jax.Array]:
  """x [..., rows, cols] -> (values [..., rows, cols] float8_e4m3fn,
  scales [..., rows/br, cols/bc] float32).

  x ~= values * scales, each scale repeated over its br x bc tile (ceil division; the last tiles
  may be partial). A tile of zeros gets scale 1.
  """
  _check(x.shape, block)
  rows, cols = x.shape[-2:]
  br, bc = block
  tiles = _tiles(x.astype(jnp.float32), block)  # [..., rows/br, br, cols/bc, bc]
  amax = jnp.max(jnp.abs(tiles), axis=(-3, -1))  # [..., rows/br, cols/bc]
  scales = amax / E4M3_MAX
  if pow2_scale:
    scales = _pow2_ceil(scales)
  scales = jnp.where(scales > 0, scales, 1.0)  # all-zero tile (or underflow): no 0/0
  scaled = tiles / scales[..., :, None, :, None]
  scaled = jnp.clip(scaled, -E4M3_MAX, E4M3_MAX)  # guard rounding of amax / scale above 448
  values = _untile(scaled, (rows, cols)).astype(FP8)
  return values, scales


def dequantize(values: jax.Array, scales: jax.Array, block: tuple[int, int],
               dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize`: values [..., rows, cols], scales [..., rows/br, cols/bc] ->
  [..., rows, cols] dtype."""
  _check(values.shape, block)
  rows, cols = values.shape[-2:]
  expected = (num_blocks(rows, block[0]), num_blocks(cols, block[1]))
  if scales.shape[-2:] != expected or scales.shape[:-2] != values.shape[:-2]:
    raise ValueError(f'dequantize: scales {scales.shape} do not tile values {values.shape} '
                     f'in blocks {block}')
  tiles = _tiles(values.astype(jnp.float32), block)
  return _untile(tiles * scales[..., :, None, :, None], (rows, cols)).astype(dtype)


def round_trip(x: jax.Array, block: tuple[int, int]) -> jax.Array:
  """x as an FP8 GEMM sees it: quantized in `block` tiles over its last two dims and dequantized,
  in x's dtype. Where a product is regrouped, as MLA's absorbed decode folds W_UK into the query,
  multiplying the round-tripped operands in high precision gives the FP8 GEMM's result up to
  accumulation order (an E4M3 value times its FP32 scale is exact up to one FP32 rounding)."""
  values, scales = quantize(x, block)
  return dequantize(values, scales, block, x.dtype)


class QuantizedWeight(NamedTuple):
  """A weight kept in E4M3 (`ModelConfig.fp8_weights`), used by the FP8 GEMMs as it is stored.

  values [*lead, *in_dims, *out_dims] float8_e4m3fn, the parameter's own shape;
  scales [*lead, ceil(I / 128), *out_dims] float32, I = prod(in_dims) the contraction: one scale
  per column of each 128-row block of the [I, O] matrix the layer multiplies (`KEPT_BLOCK`).
  A released checkpoint's 128x128 blocks of [O, I] become these by repeating each block's scale
  over its 128 columns: exactly, also where our parameters cut one of its blocks apart (MLA's
  q_b_proj rows hold a head's nope and rope parts, 192 to a head in V3). The layers take it
  where they take a weight array: `shape`, and `reshape(I, O)` to the matrix they multiply.
  """
  values: jax.Array
  scales: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  def reshape(self, rows: int, cols: int = -1) -> 'QuantizedWeight':
    """The [rows = I, cols = O] matrix (cols -1: the rest); scales [ceil(I / 128), O]."""
    values = self.values.reshape(rows, cols)
    return QuantizedWeight(values, self.scales.reshape(-1, values.shape[1]))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """values x scales in `dtype`, for a [..., I, O] matrix (reshape first)."""
    return dequantize(self.values, self.scales, KEPT_BLOCK, dtype)


def quantize_weight(w: jax.Array, lead: int = 0, in_dims: int = 1) -> QuantizedWeight:
  """w [*lead, *in_dims, *out_dims] -> its `QuantizedWeight` (scale = amax / 448 per column of
  each 128-row block of the [*lead, I, O] matrix)."""
  shape = w.shape
  I = math.prod(shape[lead:lead + in_dims])
  out_dims = shape[lead + in_dims:]
  values, scales = quantize(w.reshape(shape[:lead] + (I, math.prod(out_dims))), KEPT_BLOCK)
  return QuantizedWeight(values.reshape(shape),
                         scales.reshape(shape[:lead] + (scales.shape[-2],) + out_dims))


def _check(shape: tuple[int, ...], block: tuple[int, int]) -> None:
  if len(shape) < 2:
    raise ValueError(f'fp8: need at least 2 dims to tile, got shape {shape}')
  if len(block) != 2 or min(block) < 1:
    raise ValueError(f'fp8: block must be two positive ints (rows, cols), got {block}')


def _tiles(x: jax.Array, block: tuple[int, int]) -> jax.Array:
  """[..., rows, cols] -> [..., rows/br, br, cols/bc, bc], zero-padded up to whole tiles."""
  *lead, rows, cols = x.shape
  br, bc = block
  row_blocks, col_blocks = num_blocks(rows, br), num_blocks(cols, bc)
  pad = [(0, 0)] * len(lead) + [(0, row_blocks * br - rows), (0, col_blocks * bc - cols)]
  return jnp.pad(x, pad).reshape(*lead, row_blocks, br, col_blocks, bc)


def _untile(tiles: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """[..., rows/br, br, cols/bc, bc] -> [..., rows, cols], dropping the padding."""
  *lead, row_blocks, br, col_blocks, bc = tiles.shape
  rows, cols = shape
  return tiles.reshape(*lead, row_blocks * br, col_blocks * bc)[..., :rows, :cols]


def _pow2_ceil(s: jax.Array) -> jax.Array:
  """Smallest power of two >= s (s >= 0; 0 stays 0): UE8M0 scales."""
  mantissa, exponent = jnp.frexp(s)  # s = mantissa * 2^exponent, mantissa in [0.5, 1)
  exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)  # already a power of two
  return jnp.where(s > 0, jnp.ldexp(jnp.ones_like(s), exponent), 0.0)

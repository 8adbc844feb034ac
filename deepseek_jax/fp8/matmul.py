"""Block-scaled FP8 GEMMs (V3 report §3.3) and the FP8 linear layer: all three of its GEMMs in FP8.

Letters (deepseek_jax/DESIGN.md): Z rows (tokens), I contraction, O output columns, i a 128-wide I
block.

`scaled_matmul` multiplies already-quantized E4M3 operands: for each I block i it takes the FP8
product with FP32 accumulation, multiplies it by the two operands' scales of that block, and adds
it to an FP32 running sum — the report's "promotion to CUDA cores every N_C = 128 elements".
`accumulate='bfloat16'` rounds that running sum to BF16 after every block instead: a stand-in for
a low-precision accumulator, whose error grows with I (tests/test_fp8.py measures both).

`matmul(x, w)` quantizes high-precision operands online (x in 1x128 tiles along I, w in 128x128
blocks) and calls `scaled_matmul`. `linear(x, w)` is the same forward with a custom VJP:
  forward  y  = x  . w     x: 1x128 tiles along I,        w: 128x128 blocks
  dgrad    dx = dy . w^T   dy: 1x128 tiles along O,       w^T: the same 128x128 blocks, transposed
  wgrad    dw = x^T . dy   x and dy: 128x1 tiles along the token dim Z (the contraction here)
The forward caches x in FP8 (already re-tiled for wgrad) and the quantized weight, not x itself.

Implementations behind `scaled_matmul(impl=...)` (see `_dispatch`), one signature and semantics:
- 'jnp': the reference, literally one FP8 GEMM per I block, scaled and added in FP32;
- 'dequant': the same sum with the scales moved inside it, each element times its block i's
  scale, sum over I of (x s_x,i) (w s_w,i), as one FP32 GEMM of the dequantized operands. An
  E4M3 value times its FP32 scale is exact up to one FP32 rounding, so it differs from 'jnp' only
  by FP32 rounding and summation order (tested).
  CPUs have no FP8 units (XLA converts FP8 operands to FP32 anyway), so 'auto' picks it there:
  one GEMM instead of I/128 small ones. 'auto' is decided by the platform lowered for
  (`jax.lax.platform_dependent`): 'dequant' on CPU, 'jnp' elsewhere, also when a CPU host
  compiles for a TPU.
- 'pallas': `kernels/fp8_matmul.py`, the same per-block sum as one Pallas kernel (Triton on GPU,
  Mosaic on TPU, interpret mode on CPU). It takes x scales per row and w scales per column of
  each I block, which every layout here becomes after `_per_line`. 'auto' never picks it; the
  model's `fp8_matmul_kernel` switch does, through `kernel_impl`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.config import KERNELS  # the values of ModelConfig.fp8_matmul_kernel
from deepseek_jax.fp8.quant import (ACT_BLOCK, TOKEN_BLOCK, WEIGHT_BLOCK, QuantizedWeight,
                                    num_blocks, quantize)
from kernels import fp8_matmul as fp8_kernel
from kernels import platform, reference

BLOCK_K = 128  # N_C: I elements per FP8 partial product before promotion to FP32
ACCUMULATE = ('float32', 'bfloat16')
IMPLS = ('auto', 'jnp', 'dequant', 'pallas')
MIN_FP8_COMPUTE_CAPABILITY = 8.9  # Ada / Hopper: the first GPUs with FP8 tensor cores


def scaled_matmul(x_values: jax.Array, x_scales: jax.Array, w_values: jax.Array,
                  w_scales: jax.Array, *, accumulate: str = 'float32',
                  impl: str = 'auto') -> jax.Array:
  """FP8 x [Z, I] . FP8 w [I, O] -> float32 [Z, O], scales applied per 128-wide I block.

  x_scales [Z, I/128] (1x128 tiles) or [Z/128, I/128] (128x128 blocks);
  w_scales [I/128, O/128] (128x128 blocks) or [I/128, O] (128x1 tiles). Divisions round up.
  """
  Z, I = x_values.shape
  I2, O = w_values.shape
  if I != I2:
    raise ValueError(f'scaled_matmul: contraction dims differ, x {x_values.shape}, '
                     f'w {w_values.shape}')
  if accumulate not in ACCUMULATE:
    raise ValueError(f'scaled_matmul: accumulate={accumulate!r}, expected one of {ACCUMULATE}')
  Ib = num_blocks(I, BLOCK_K)
  if x_scales.shape[1] != Ib or w_scales.shape[0] != Ib:
    raise ValueError(f'scaled_matmul: scales {x_scales.shape}, {w_scales.shape} are not per '
                     f'{BLOCK_K}-wide block of I = {I}')
  x_scales = _per_line(x_scales, Z, axis=0)  # [Z, I/128]
  w_scales = _per_line(w_scales, O, axis=1)  # [I/128, O]
  return _dispatch(impl)(x_values, x_scales, w_values, w_scales, accumulate)


def matmul(x: jax.Array, w: jax.Array | QuantizedWeight, *, pow2_scale: bool = False,
           accumulate: str = 'float32', impl: str = 'auto') -> jax.Array:
  """x [..., I] . w [I, O] -> [..., O] in x's dtype: x quantized online to E4M3 in 1x128 tiles,
  w in 128x128 blocks, or as it is stored when it is a `QuantizedWeight` (kept E4M3 weights).

  Forward only; to train through it use `linear` (same forward, FP8 backward).
  """
  *lead, I = x.shape
  O = w.shape[1]
  x_values, x_scales = quantize(x.reshape(-1, I), ACT_BLOCK, pow2_scale=pow2_scale)
  if isinstance(w, QuantizedWeight):
    w_values, w_scales = w
  else:
    w_values, w_scales = quantize(w, WEIGHT_BLOCK, pow2_scale=pow2_scale)
  y = scaled_matmul(x_values, x_scales, w_values, w_scales, accumulate=accumulate, impl=impl)
  return y.reshape(*lead, O).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, *, pow2_scale: bool = False,
           impl: str = 'auto') -> jax.Array:
  """x [..., I] . w [I, O] -> [..., O] in x's dtype; forward, dgrad and wgrad all in FP8.

  A drop-in for `jnp.einsum('...I,IO->...O', x, w)`. Gradients come back in x's and w's dtypes.
  """
  *lead, I = x.shape
  O = w.shape[1]
  # Through float32 so the custom VJP needs no dtype bookkeeping: the cast's transpose returns
  # dw in w's dtype (a no-op for FP32 master weights).
  y = _fp8_linear(x.reshape(-1, I), w.astype(jnp.float32), pow2_scale, impl)
  return y.reshape(*lead, O)


def expert_linear(x: jax.Array, w: jax.Array, *, pow2_scale: bool = False,
                  impl: str = 'auto') -> jax.Array:
  """Per-expert FP8 linear: x [E, Z, I] . w [E, I, O] -> [E, Z, O] ('EZI,EIO->EZO')."""
  return jax.vmap(functools.partial(linear, pow2_scale=pow2_scale, impl=impl))(x, w)


def kernel_impl(kernel: str) -> str:
  """The `impl` for the model's `fp8_matmul_kernel` switch: 'xla' -> 'auto' (the XLA GEMMs),
  'pallas' -> the kernel, 'auto' -> the kernel on a TPU (Mosaic; every generation, widened to
  BF16 where the MXU has no FP8) or a GPU with FP8 tensor cores (Triton), else 'auto'. The host
  decides 'auto'; under 'pallas' the kernel itself picks Triton or Mosaic by the platform being
  lowered for, so a program compiled ahead of time for a TPU from a CPU host gets Mosaic."""
  if kernel == 'xla':
    return 'auto'
  if kernel == 'pallas':
    return 'pallas'
  if kernel == 'auto':
    return 'pallas' if jax.default_backend() == 'tpu' or _has_fp8_gpu() else 'auto'
  raise ValueError(f'fp8 kernel {kernel!r}, expected one of {KERNELS}')


def _has_fp8_gpu() -> bool:
  """A CUDA device of compute capability >= 8.9 (the kernel lowers through Pallas Triton)."""
  if jax.default_backend() != 'gpu':
    return False
  capability = getattr(jax.devices()[0], 'compute_capability', None)  # e.g. '9.0'; None on ROCm
  try:
    return float(capability) >= MIN_FP8_COMPUTE_CAPABILITY
  except (TypeError, ValueError):
    return False


# ---- the custom VJP ------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fp8_linear(x, w, pow2_scale, impl):
  return _fp8_linear_fwd(x, w, pow2_scale, impl)[0]


def _fp8_linear_fwd(x, w, pow2_scale, impl):
  x_values, x_scales = quantize(x, ACT_BLOCK, pow2_scale=pow2_scale)
  w_values, w_scales = quantize(w, WEIGHT_BLOCK, pow2_scale=pow2_scale)
  y = scaled_matmul(x_values, x_scales, w_values, w_scales, impl=impl).astype(x.dtype)
  xt_values, xt_scales = quantize(x, TOKEN_BLOCK, pow2_scale=pow2_scale)  # cached for wgrad
  return y, (xt_values, xt_scales, w_values, w_scales)


def _fp8_linear_bwd(pow2_scale, impl, residuals, dy):
  xt_values, xt_scales, w_values, w_scales = residuals
  # dgrad: contraction over O, so dy is tiled 1x128 along O; w^T keeps its 128x128 blocks.
  dy_values, dy_scales = quantize(dy, ACT_BLOCK, pow2_scale=pow2_scale)
  dx = scaled_matmul(dy_values, dy_scales, w_values.T, w_scales.T, impl=impl)
  # wgrad: contraction over tokens, so x and dy are both tiled 128x1 along Z.
  dyt_values, dyt_scales = quantize(dy, TOKEN_BLOCK, pow2_scale=pow2_scale)
  dw = scaled_matmul(xt_values.T, xt_scales.T, dyt_values, dyt_scales, impl=impl)
  return dx.astype(dy.dtype), dw


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


# ---- implementations -----------------------------------------------------------------------------

def _dispatch(impl: str):
  """The one place a backend-specific kernel plugs in (e.g. Pallas on GPU/TPU). 'auto' is decided
  by the platform lowered for, not the host: a program compiled ahead of time for a TPU from a
  CPU host gets 'jnp' (FP8 dots), not 'dequant' (float32 copies of the weights)."""
  if impl == 'auto':
    return _scaled_matmul_auto
  if impl == 'jnp':
    return _scaled_matmul_jnp
  if impl == 'dequant':
    return _scaled_matmul_dequant
  if impl == 'pallas':
    return _scaled_matmul_pallas
  raise ValueError(f'scaled_matmul: impl={impl!r}, expected one of {IMPLS}')


def _scaled_matmul_auto(x_values, x_scales, w_values, w_scales, accumulate):
  pick = lambda impl: lambda *arrays: impl(*arrays, accumulate)
  return jax.lax.platform_dependent(x_values, x_scales, w_values, w_scales,
                                    cpu=pick(_scaled_matmul_dequant),
                                    default=pick(_scaled_matmul_jnp))


def _scaled_matmul_dequant(x_values, x_scales, w_values, w_scales, accumulate):
  """One FP32 GEMM of the dequantized operands (see the module docstring); shapes as `jnp`."""
  if accumulate != 'float32':  # a rounded running sum only exists block by block
    return _scaled_matmul_jnp(x_values, x_scales, w_values, w_scales, accumulate)
  I = x_values.shape[1]
  x = x_values.astype(jnp.float32) * _per_line(x_scales, I, axis=1)  # a scale per I element
  w = w_values.astype(jnp.float32) * _per_line(w_scales, I, axis=0)
  return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _scaled_matmul_pallas(x_values, x_scales, w_values, w_scales, accumulate):
  """The Pallas kernel; shapes as `jnp` (x scales per row, w scales per column of an I block).
  Where the GEMM is not per device, the XLA GEMMs instead (`_partitioned_by_xla`)."""
  if accumulate != 'float32' or _partitioned_by_xla():  # the kernel sums in FP32 only
    return _scaled_matmul_jnp(x_values, x_scales, w_values, w_scales, accumulate)
  return fp8_kernel.fp8_matmul(x_values, x_scales, w_values, w_scales)


def _partitioned_by_xla() -> bool:
  """Whether XLA partitions this GEMM over a mesh (`kernels.platform.partitioned_axes`), which it
  cannot do with a Pallas call: there the XLA GEMMs run. The kernel runs where each device has
  its own GEMM: one device, or inside shard_map (the experts' GEMMs,
  `layers/expert_parallel.py`). Running MLA's and the dense FFNs' GEMMs through the kernel on a
  mesh needs them wrapped in shard_map too (rows split over the batch axes; the weight
  gradient's contraction over tokens summed with psum)."""
  return bool(platform.partitioned_axes())


def _scaled_matmul_jnp(x_values, x_scales, w_values, w_scales, accumulate):
  """Reference: x_values [Z, I], x_scales [Z, I/128], w_values [I, O], w_scales [I/128, O]."""
  return reference.block_scaled_matmul(x_values, x_scales, w_values, w_scales, accumulate)


_per_line = reference.per_line  # scales per line or per 128 lines -> per line

"""The Pallas FP8 block-scaled GEMM (`kernels/fp8_matmul.py`, interpret mode on CPU) against the
plain-jnp reference and a float64 numpy blockwise sum, its shape checks, and the model's
`fp8_matmul_kernel='pallas'` switch against the XLA path ('xla') in the linear layers and a tiny
FP8 model.

Tolerances: FP32 output within 1e-5 of the largest reference magnitude (the same products, summed
in another order), BF16 output within 2e-2 (one BF16 rounding of the output, 2^-8 relative)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import model as model_lib
from tests.tiny import FP8_WIDTHS, tiny_config
from deepseek_jax.fp8 import quant
from deepseek_jax.layers import linear
from kernels import fp8_matmul as kernel
from kernels import reference
from tests.kernel_util import blockwise_np

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))  # one program, not op-by-op dispatch
def operands(M: int, K: int, N: int, b_block=quant.WEIGHT_BLOCK, seed: int = 0):
  """Quantized a [M, K] (1x128 tiles) and b [K, N] (`b_block` tiles), their rows and columns
  scaled over three orders of magnitude so that every block gets a different scale."""
  keys = jax.random.split(jax.random.key(seed), 4)
  a = jax.random.normal(keys[0], (M, K)) * jnp.exp(3 * jax.random.normal(keys[1], (1, K)))
  b = jax.random.normal(keys[2], (K, N)) * jnp.exp(3 * jax.random.normal(keys[3], (K, 1)))
  return (*quant.quantize(a, quant.ACT_BLOCK), *quant.quantize(b, b_block))


@functools.partial(jax.jit, static_argnames=('out_dtype', 'block_m'))
def pallas_matmul(a_values, a_scales, b_values, b_scales, out_dtype, block_m=None):
  return kernel.fp8_matmul(a_values, a_scales, b_values, b_scales, out_dtype, block_m=block_m,
                           interpret=True)


def max_error(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(y - ref).max() / np.abs(ref).max())


# ---- the kernel ----------------------------------------------------------------------------------

@pytest.mark.parametrize('out_dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('M, K, N, block_m', [
    (40, 300, 200, 32),   # nothing a multiple of the tiles: 2 x 2 tiles, 3 K blocks, all padded
    (128, 256, 256, 64),  # multiples: 2 x 2 tiles, 2 K blocks, no padding
])
def test_kernel_equals_reference_and_float64(M, K, N, block_m, out_dtype):
  a_values, a_scales, b_values, b_scales = operands(M, K, N)
  y = pallas_matmul(a_values, a_scales, b_values, b_scales, out_dtype, block_m)
  assert y.shape == (M, N) and y.dtype == out_dtype
  ref = jax.jit(reference.fp8_matmul)(a_values, a_scales, b_values, b_scales)  # float32
  assert max_error(y, ref) <= TOLERANCE[out_dtype]
  assert max_error(y, blockwise_np(a_values, a_scales, b_values, b_scales)) <= TOLERANCE[out_dtype]


def test_kernel_takes_per_column_b_scales():
  """b tiled 128x1 (the wgrad GEMM's dy): b_scales [Kb, N], one per column of each K block."""
  a_values, a_scales, b_values, b_scales = operands(24, 200, 40, b_block=quant.TOKEN_BLOCK)
  assert b_scales.shape == (2, 40)
  y = pallas_matmul(a_values, a_scales, b_values, b_scales, jnp.float32)  # default block_m = 32
  assert max_error(y, blockwise_np(a_values, a_scales, b_values, b_scales)) <= 1e-5


def test_kernel_checks_shapes_and_dtypes_by_name():
  a_values, a_scales, b_values, b_scales = operands(4, 300, 200)
  call = functools.partial(kernel.fp8_matmul, interpret=True)
  with pytest.raises(ValueError, match=r'a_scales \(4, 2\) is not per 1x128 tile of a \(4, 300\): '
                     r'expected \(4, 3\)'):
    call(a_values, a_scales[:, :2], b_values, b_scales)
  with pytest.raises(ValueError, match=r'b_scales \(3, 3\) is neither per 128x128 block nor per '
                     r'128x1 tile of b \(300, 200\): expected \(3, 2\) or \(3, 200\)'):
    call(a_values, a_scales, b_values, jnp.ones((3, 3), jnp.float32))
  with pytest.raises(ValueError, match=r'contraction dims differ, a \(4, 300\), b \(256, 200\)'):
    call(a_values, a_scales, b_values[:256], b_scales)
  with pytest.raises(ValueError, match='a_values has dtype float32, expected float8_e4m3fn'):
    call(a_values.astype(jnp.float32), a_scales, b_values, b_scales)
  with pytest.raises(ValueError, match='b_scales has dtype bfloat16, expected float32'):
    call(a_values, a_scales, b_values, b_scales.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match='out_dtype float16, expected float32 or bfloat16'):
    call(a_values, a_scales, b_values, b_scales, jnp.float16)
  with pytest.raises(ValueError, match='block_m=48 must be a power of two >= 16'):
    call(a_values, a_scales, b_values, b_scales, block_m=48)
  with pytest.raises(ValueError, match='block_n=8 must be a power of two >= 16'):
    call(a_values, a_scales, b_values, b_scales, block_n=8)


# ---- the model's switch --------------------------------------------------------------------------

def test_fp8_linear_with_pallas_equals_xla_forward_and_gradients():
  """All three GEMMs (forward; dgrad with w^T's blocks; wgrad with 128x1 tiles of x and dy)."""
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (3, 16, 200))
  w = jax.random.normal(keys[1], (200, 136)) * 0.1
  d_y = jax.random.normal(keys[2], (3, 16, 136))

  @functools.partial(jax.jit, static_argnames='fp8_kernel')
  def value_and_grads(x, w, fp8_kernel):
    y, vjp = jax.vjp(functools.partial(linear.linear, precision='fp8', fp8_kernel=fp8_kernel),
                     x, w)
    return y, *vjp(d_y)

  for ours, xla in zip(value_and_grads(x, w, 'pallas'), value_and_grads(x, w, 'xla')):
    assert max_error(ours, xla) <= 1e-5


def test_fp8_batched_linear_with_pallas_equals_xla():
  """The per-expert form (`fp8.expert_linear`, the kernel under vmap): forward and gradients."""
  keys = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(keys[0], (2, 16, 160))
  w = jax.random.normal(keys[1], (2, 160, 48)) * 0.1
  d_y = jax.random.normal(keys[2], (2, 16, 48))

  @functools.partial(jax.jit, static_argnames='fp8_kernel')
  def value_and_grads(x, w, fp8_kernel):
    f = functools.partial(linear.batched_linear, precision='fp8', fp8_kernel=fp8_kernel)
    y, vjp = jax.vjp(f, x, w)
    return y, *vjp(d_y)

  for ours, xla in zip(value_and_grads(x, w, 'pallas'), value_and_grads(x, w, 'xla')):
    assert max_error(ours, xla) <= 1e-5


def kernel_call_count(jaxpr: str) -> int:
  """Kernel calls in a jaxpr: each holds one Triton and one Mosaic pallas_call per platform
  branch, and exactly one named fp8_matmul_tpu."""
  return jaxpr.count('name=fp8_matmul_tpu ') + jaxpr.count('name=fp8_matmul_tpu\n')


# One MoE block (MLA, shared and routed experts), no MTP: interpret mode compiles every GEMM.
TINY = tiny_config(**FP8_WIDTHS, num_layers=1, first_k_dense=0, mtp_depth=0, precision='fp8')


def test_tiny_fp8_model_with_pallas_equals_xla():
  """Measured 6e-7. The 'xla' GEMM on CPU ('dequant') sums in another order than the kernel, so
  a later quantization can round one E4M3 value the other way: in a 3-block model that moved a
  logit by 2% (while the kernel stayed bitwise equal to the blockwise 'jnp' reference)."""
  tokens = jax.random.randint(jax.random.key(5), (1, 16), 0, TINY.vocab_size)
  logits, kernel_calls = {}, {}
  for choice in ('pallas', 'xla'):
    graphdef, state = nnx.split(model_lib.create(TINY.replace(fp8_matmul_kernel=choice), 0))
    traced = jax.jit(lambda s, graphdef=graphdef: model_lib.apply(graphdef, s, tokens).logits
                     ).trace(state)
    kernel_calls[choice] = kernel_call_count(str(traced.jaxpr))
    logits[choice] = traced.lower().compile()(state)
  # Every FP8 GEMM went through the switch: 8 in MLA, 3 in the shared and 3 in the routed experts.
  assert kernel_calls == {'pallas': 14, 'xla': 0}, kernel_calls
  assert max_error(logits['pallas'], logits['xla']) <= 1e-5


def test_every_fp8_gemm_of_dense_moe_and_mtp_blocks_takes_the_switch():
  """Traced only: a dense block (8 MLA + 3 FFN GEMMs) and two MoE blocks, the second in MTP."""
  cfg = TINY.replace(num_layers=2, first_k_dense=1, mtp_depth=1, fp8_matmul_kernel='pallas')
  graphdef, state = nnx.split(model_lib.create(cfg, 0))
  tokens = jnp.zeros((1, 16), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda s: model_lib.apply(graphdef, s, tokens).logits)(state)
  assert kernel_call_count(str(jaxpr)) == 11 + 14 + 14

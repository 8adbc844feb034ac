"""The kernels compile for the hardware they are written for, checked on a CPU.

GPU: each kernel, at the benchmark's shapes, lowers for CUDA through Pallas' Triton backend (the
module holds the `__gpu$xla.gpu.triton` call with the kernel's name, and nothing of Mosaic GPU,
which JAX 0.10 picks for a pallas_call without Triton compiler parameters). No GPU or CUDA
plugin is needed to lower.

TPU: with libtpu installed (the test extra installs it), each kernel is compiled ahead of time
by XLA's TPU compiler, Mosaic included, for one chip of a v5e, v5p, v6e and tpu7x slice at
DeepSeek-V3's shapes, through `backend=None`: the platform being lowered for picks the Mosaic
kernel although the host is a CPU.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kernels import fp8_matmul, mla_decode

# Before libtpu loads: no metadata server to ask, and other processes (the suite's subprocesses,
# another test run) may hold libtpu's lock file.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install '
                                  '-e ".[test]" installs it): TPU ahead-of-time compilation '
                                  'needs its compiler')

TRITON_CALL = '@__gpu$xla.gpu.triton'
GPU_MLA = dict(B=128, N=128, C=512, R=64, S=4096)  # experiments/bench_kernels.py
V3_MLA = dict(B=64, N=128, C=512, R=64, S=4096)
V3_GEMMS = [(4096, 7168, 2048), (4096, 2048, 7168)]  # (M, N, K): bench_kernels' V3 shapes
TOPOLOGIES = ['v5e:2x2', 'v5p:2x2x1', 'v6e:2x2', 'tpu7x:2x2x1']
PAGE = 64


def decode_args(B, N, C, R, S, Tq, paged, sharding=None):
  """Abstract BF16 arguments of `mla_decode` (paged: a pool of B x S / PAGE pages)."""
  def sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  queries = (sds((B, Tq, N, C)), sds((B, Tq, N, R)))
  if paged:
    pages = S // PAGE
    return (*queries, sds((B * pages, PAGE, C)), sds((B * pages, PAGE, R)),
            sds((B,), jnp.int32), sds((B, pages), jnp.int32))
  return (*queries, sds((B, S, C)), sds((B, S, R)), sds((B,), jnp.int32))


def decode_fn(paged, **options):
  if paged:
    return lambda q, qr, c, kr, lengths, table: mla_decode.mla_decode(
        q, qr, c, kr, lengths, 0.1, block_table=table, **options)
  return lambda q, qr, c, kr, lengths: mla_decode.mla_decode(q, qr, c, kr, lengths, 0.1,
                                                             **options)


def gemm_args(M, N, K, sharding=None):
  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return (sds((M, K), jnp.float8_e4m3fn), sds((M, K // 128), jnp.float32),
          sds((K, N), jnp.float8_e4m3fn), sds((K // 128, N // 128), jnp.float32))


def assert_triton_module(text: str, name: str):
  assert text.count(TRITON_CALL) == 1, 'expected one Triton kernel call'
  assert f'name = "{name}"' in text
  assert 'mosaic' not in text.lower(), 'lowered through Mosaic GPU'


# ---- GPU: Triton, explicitly ---------------------------------------------------------------------

@pytest.mark.parametrize('paged', [False, True], ids=['contiguous', 'paged'])
@pytest.mark.parametrize('Tq', [1, 2])
def test_decode_lowers_for_cuda_through_triton(Tq, paged):
  args = decode_args(**GPU_MLA, Tq=Tq, paged=paged)
  text = jax.jit(decode_fn(paged)).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  assert_triton_module(text, 'mla_decode')


@pytest.mark.parametrize('M,N,K', V3_GEMMS)
def test_fp8_gemm_lowers_for_cuda_through_triton(M, N, K):
  f = lambda *a: fp8_matmul.fp8_matmul(*a, out_dtype=jnp.bfloat16, block_m=64)
  text = jax.jit(f).trace(*gemm_args(M, N, K)).lower(lowering_platforms=('cuda',)).as_text()
  assert_triton_module(text, 'fp8_matmul')


def test_without_triton_parameters_jax_picks_mosaic_gpu():
  """Why the parameters are passed: the same kind of call without them goes to Mosaic GPU."""
  from jax.experimental import pallas as pl

  def double(x_ref, o_ref):
    o_ref[...] = 2 * x_ref[...]

  call = pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32))
  text = jax.jit(call).trace(jnp.zeros((16, 128))).lower(lowering_platforms=('cuda',)).as_text()
  assert TRITON_CALL not in text and 'mosaic_gpu' in text


# ---- TPU: Mosaic, compiled ahead of time ---------------------------------------------------------

def one_chip(topology: str) -> NamedSharding:
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topology_name=topology, platform='tpu').devices
  return NamedSharding(Mesh(devices[:1], ('chip',)), PartitionSpec())


def compile_for_tpu(fn, args):
  lowered = jax.jit(fn).lower(*args)
  return lowered, lowered.compile()


@needs_libtpu
@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_decode_compiles_for_tpu_at_v3_shapes(topology):
  """Tq 1 and 2, contiguous and paged on v5e; decode over the contiguous cache and the MTP
  verify step over the paged one on the other generations (each compile takes seconds)."""
  sharding = one_chip(topology)
  cases = [(1, False), (2, True)] + ([(2, False), (1, True)] if topology == TOPOLOGIES[0] else [])
  for Tq, paged in cases:
    lowered, compiled = compile_for_tpu(decode_fn(paged),
                                        decode_args(**V3_MLA, Tq=Tq, paged=paged,
                                                    sharding=sharding))
    text = lowered.as_text()
    assert 'tpu_custom_call' in text and 'mla_decode_tpu' in text, (Tq, paged)
    assert TRITON_CALL not in text
    B, N, C = V3_MLA['B'], V3_MLA['N'], V3_MLA['C']
    assert compiled.memory_analysis().output_size_in_bytes >= B * Tq * N * C * 2


@needs_libtpu
@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_fp8_gemm_compiles_for_tpu_at_v3_shapes(topology):
  sharding = one_chip(topology)
  M, N, K = V3_GEMMS[0]
  for native_fp8 in (False, True):  # widened to BF16 in VMEM, and FP8 tiles into the dot
    f = lambda *a: fp8_matmul.fp8_matmul(*a, out_dtype=jnp.bfloat16, native_fp8=native_fp8)
    lowered, compiled = compile_for_tpu(f, gemm_args(M, N, K, sharding))
    assert 'tpu_custom_call' in lowered.as_text() and 'fp8_matmul_tpu' in lowered.as_text()
    assert compiled.memory_analysis().output_size_in_bytes == M * N * 2


@needs_libtpu
def test_mosaic_decode_takes_shapes_triton_does_not():
  """C = 48, R = 8 (not Triton's powers of two >= 16) compile with backend='mosaic_tpu'."""
  args = decode_args(B=2, N=4, C=48, R=8, S=200, Tq=2, paged=False, sharding=one_chip('v5e:2x2'))
  lowered, _ = compile_for_tpu(decode_fn(False, backend='mosaic_tpu'), args)
  assert 'mla_decode_tpu' in lowered.as_text()
  with pytest.raises(ValueError, match='kv_lora_rank C=48 must be a power of two'):
    jax.jit(decode_fn(False)).lower(*args)  # None also traces the Triton kernel


# ---- the whole model's decode step ---------------------------------------------------------------

def model_decode_step(platform: str):
  """`inference.decode.step` (the decoder's own jitted step: the model's one forward pass against
  the latent cache, then sampling) for the tiny config with `mla_decode_kernel='pallas'` in BF16,
  lowered with abstract arguments: (lowered, abstract args) on one chip of a v5e slice for 'tpu',
  for CUDA through `lowering_platforms` otherwise."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from deepseek_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from deepseek_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from deepseek_jax.inference import cache as cache_lib  # pylint: disable=import-outside-toplevel
  from deepseek_jax.inference import decode, sampling  # pylint: disable=import-outside-toplevel
  from experiments.configs import tiny  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict()).replace(
      num_layers=2, mla_decode_kernel='pallas', dtype='bfloat16')
  graphdef, state = nnx.split(model_lib.abstract(cfg))
  sharding = one_chip('v5e:2x2') if platform == 'tpu' else None
  place = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  B = 8
  args = (place(state), place(jax.ShapeDtypeStruct((B,), jnp.int32)),
          place(jax.eval_shape(lambda: cache_lib.init(cfg, B, 256))),
          place(jax.eval_shape(lambda: jax.random.key(0))),
          place(jax.ShapeDtypeStruct((), jnp.int32)))
  jitted = jax.jit(decode.step, static_argnums=(0, 1), donate_argnames='cache')
  statics = (graphdef, sampling.Sampling())
  if platform == 'tpu':
    return jitted.lower(*statics, *args)
  return jitted.trace(*statics, *args).lower(lowering_platforms=('cuda',))


@needs_libtpu
def test_model_decode_step_compiles_for_tpu_with_the_mosaic_kernel():
  """One Mosaic kernel call per layer, compiled by libtpu; the cache is donated (aliased)."""
  lowered = model_decode_step('tpu')
  text = lowered.as_text()
  assert text.count('mla_decode_tpu') >= 2 and TRITON_CALL not in text
  compiled = lowered.compile()
  assert compiled.memory_analysis().alias_size_in_bytes > 0


def test_model_decode_step_lowers_for_cuda_with_the_triton_kernel():
  text = model_decode_step('cuda').as_text()
  assert text.count(TRITON_CALL) == 2  # one per layer
  assert 'mosaic' not in text.lower()


@needs_libtpu
@pytest.mark.parametrize('what', ['train', 'decode'])
@pytest.mark.parametrize('kernel', ['pallas', 'xla'])
def test_fp8_model_compiles_for_a_tpu_mesh_with_the_kernels(what, kernel):
  """The tiny FP8 model with both kernel switches at 'pallas' on all 4 devices of v5e:2x2 (the
  `experiments.compile` step; decode with its weights kept in E4M3). The routed experts' GEMMs
  run the Mosaic FP8 kernel inside their shard_map, whose output is told which axes it varies
  over (`kernels.tiles.out_struct`); the GEMMs XLA partitions take the XLA FP8 GEMMs
  (`fp8.matmul._partitioned_by_xla`); the decode attention kernel runs in a shard_map of its own
  over the batch. Before these, neither step traced: shard_map refused the kernel's output, and
  XLA cannot partition a Mosaic call. With both switches at 'xla' the FP8 GEMMs are XLA's
  per-block FP8 dots ('jnp', picked for the TPU although the host is a CPU), whose running sum
  did not trace inside the experts' shard_map either."""
  from deepseek_jax.analysis import compile as compile_lib
  from experiments.configs import tiny
  config = tiny.get_config()
  config.model.update(precision='fp8', fp8_matmul_kernel=kernel, fp8_weights=what == 'decode',
                      mla_decode_kernel=kernel)
  target = compile_lib.target(config, compile_lib.topology_devices('v5e:2x2'), what)
  with jax.set_mesh(target.mesh):
    lowered = target.jitted.lower(*target.args)
  text = lowered.as_text()
  cfg = target.run.model
  # gate, up and down of each MoE layer; training adds the MTP block's, the forward again (the
  # dispatch is rematerialized) and both gradients of each
  gemms = (3 * (cfg.num_moe_layers + cfg.mtp_depth) * 4 if what == 'train'
           else 3 * cfg.num_moe_layers)
  attention = cfg.num_layers if what == 'decode' else 0  # one decode kernel per layer
  if kernel == 'xla':
    gemms = attention = 0
    assert 'f8E4M3FN' in text  # the FP8 dots
  assert text.count('tpu_custom_call') == gemms + attention
  assert text.count('fp8_matmul_tpu') == gemms
  assert lowered.compile().memory_analysis() is not None


def test_fp8_decode_step_on_a_mesh_lowers_for_cuda_with_the_kernels():
  """The same on a GPU mesh (4 CPU devices, data 1 x expert 2 x plane 2), lowered for CUDA: the
  kept-FP8 tiny model's decode step holds one Triton call per routed-expert GEMM (inside their
  shard_map) and one decode call per layer (in a shard_map over the batch)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from deepseek_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from deepseek_jax import sharding  # pylint: disable=import-outside-toplevel
  from deepseek_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from deepseek_jax.inference import cache as cache_lib  # pylint: disable=import-outside-toplevel
  from deepseek_jax.inference import decode, sampling  # pylint: disable=import-outside-toplevel
  from experiments.configs import tiny  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict()).replace(
      num_layers=2, dtype='bfloat16', precision='fp8', fp8_weights=True,
      mla_decode_kernel='pallas', fp8_matmul_kernel='pallas')
  mesh = sharding.make_mesh(1, 2, 2)
  graphdef, state = nnx.split(model_lib.abstract(cfg))
  state = sharding.with_shardings(state, sharding.variable_shardings(state, mesh,
                                                                      sharding.rules()))
  B = 8
  cache = jax.eval_shape(lambda: cache_lib.init(cfg, B, 256))
  cache = sharding.with_shardings(cache, cache_lib.shardings(cache, mesh))
  rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH))
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (state, jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows), cache,
          jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh)),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)))
  jitted = jax.jit(decode.step, static_argnums=(0, 1), donate_argnames='cache')
  with jax.set_mesh(mesh):
    text = jitted.trace(graphdef, sampling.Sampling(), *args).lower(
        lowering_platforms=('cuda',)).as_text()
  gemms = 3 * cfg.num_moe_layers
  assert text.count(TRITON_CALL) == gemms + cfg.num_layers

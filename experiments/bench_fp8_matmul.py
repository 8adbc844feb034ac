"""FP8 vs BF16 matmul throughput through XLA for DeepSeek-V3's GEMM shapes (V3 report §3.3).

For each shape [Z, I] x [I, O] it times, under jit:
  bf16        x and w in BF16, FP32 accumulation;
  fp8_tensor  E4M3 operands with one scale each (XLA's scaled-dot pattern, cuBLASLt FP8 on GPU);
  fp8_block   our fine-grained path (`deepseek_jax.fp8`): 1x128 / 128x128 scales, FP32 promotion
              every 128 I elements, quantization of both operands included.
and prints one JSON line per shape with TFLOP/s (2 Z I O / time; the line's keys 'M', 'K', 'N'
hold Z, I, O). Meant for a GPU; on CPU use --small (XLA emulates FP8 there, so the figures only
check that everything runs).

  python -m experiments.bench_fp8_matmul [--tokens=4096] [--small]
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from deepseek_jax import fp8
from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8.matmul import matmul as fp8_matmul

_TOKENS = flags.DEFINE_integer('tokens', 4096, 'Z: tokens per GEMM.')
_SMALL = flags.DEFINE_bool('small', False, 'Tiny shapes (CPU smoke test).')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per measurement (best is kept).')


def v3_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(I, O) of the GEMMs the FP8 policy covers, from the V3 config."""
  D, N = cfg.hidden_size, cfg.num_heads
  return {
      'mla_w_dq': (D, cfg.q_lora_rank),
      'mla_w_uq': (cfg.q_lora_rank, N * cfg.qk_head_dim),
      'mla_w_dkv': (D, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
      'mla_w_o': (N * cfg.v_head_dim, D),
      'expert_gate': (D, cfg.moe_intermediate_size),
      'expert_down': (cfg.moe_intermediate_size, D),
      'dense_gate': (D, cfg.intermediate_size),
  }


def _best_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def _per_tensor(x, w):
  sx = jnp.max(jnp.abs(x)) / fp8.E4M3_MAX
  sw = jnp.max(jnp.abs(w)) / fp8.E4M3_MAX
  xq = (x / sx).astype(jnp.float8_e4m3fn)
  wq = (w / sw).astype(jnp.float8_e4m3fn)
  return jnp.dot(xq, wq, preferred_element_type=jnp.float32) * (sx * sw)


def main(argv):
  del argv
  cfg = ModelConfig()
  shapes = v3_shapes(cfg)
  M = _TOKENS.value
  if _SMALL.value:
    M, shapes = 256, {'small': (512, 384)}
  kernels = {
      'bf16': jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                           preferred_element_type=jnp.float32)),
      'fp8_tensor': jax.jit(_per_tensor),
      'fp8_block': jax.jit(fp8_matmul),
  }
  for name, (K, N) in shapes.items():
    x = jax.random.normal(jax.random.key(0), (M, K), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (K, N), jnp.float32) * K ** -0.5
    row = {'gemm': name, 'M': M, 'K': K, 'N': N, 'device': jax.devices()[0].device_kind}
    for kernel_name, kernel in kernels.items():
      seconds = _best_seconds(kernel, x, w)
      row[f'{kernel_name}_tflops'] = 2 * M * K * N / seconds / 1e12
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)

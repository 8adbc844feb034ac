"""FP8 (E4M3) training with fine-grained block scaling, V3 report §3.3.

`quant`: online per-tile quantization (1x128 activations, 128x128 weights, optional UE8M0 scales).
`matmul`: block-scaled GEMM with FP32 promotion every 128 K elements, and `linear` /
`expert_linear`, whose forward, input-gradient and weight-gradient GEMMs all run in FP8.
`QuantizedWeight`: a weight kept in E4M3 with its scales (inference on released FP8 weights),
which `matmul` multiplies as it is stored.

Swapping one into a layer: `jnp.einsum('BTD,DC->BTC', x, w)` becomes `fp8.linear(x, w)`.
The forward-only `matmul(x, w)` is not re-exported here, so that `fp8.matmul` stays the module:
`from deepseek_jax.fp8.matmul import matmul`.
"""

from deepseek_jax.fp8.matmul import expert_linear, linear, scaled_matmul
from deepseek_jax.fp8.quant import (ACT_BLOCK, E4M3_MAX, FP8, KEPT_BLOCK, TOKEN_BLOCK, WEIGHT_BLOCK,
                                    QuantizedWeight, dequantize, quantize, quantize_weight)

__all__ = ['ACT_BLOCK', 'E4M3_MAX', 'FP8', 'KEPT_BLOCK', 'TOKEN_BLOCK', 'WEIGHT_BLOCK',
           'QuantizedWeight', 'dequantize', 'expert_linear', 'linear', 'quantize',
           'quantize_weight', 'scaled_matmul']

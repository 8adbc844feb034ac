"""Pallas kernels, each beside a plain-jnp reference (`reference.py`).

`mla_decode.mla_decode`: latent-attention decode over the contiguous or paged latent cache.
`fp8_matmul.fp8_matmul`: the block-scaled FP8 GEMM (1x128 / 128x128 scales, FP32 promotion).
Each has a Triton layout (`mla_decode.py`, `fp8_matmul.py`) and a Mosaic TPU layout
(`mla_decode_tpu.py`, `fp8_matmul_tpu.py`) behind the one function, picked by the platform
being lowered for (`platform.py`). The model calls them through its `mla_decode_kernel` and
`fp8_matmul_kernel` switches. This package imports nothing from `deepseek_jax`.
"""

"""Pallas kernels, each beside a plain-jnp reference (latent-attention decode, FP8 matmul).

Empty until the kernels issue lands; the model runs on its jnp paths everywhere.
"""

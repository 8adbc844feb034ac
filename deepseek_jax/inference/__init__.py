"""Inference: the latent KV cache, absorbed and naive cached attention, prefill/decode, sampling
and speculative decoding with the MTP module(s) as the drafter."""

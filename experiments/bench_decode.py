"""Decode speed and cache size: the absorbed latent cache against the naive materialized cache at
several cache lengths, on a model with DeepSeek's MLA shapes (N 32, H 128, R 64, U 128, C 512,
Q 1536, D 2048, a few dense layers); then speculative against plain greedy decoding on a trained
checkpoint (skipped with a message when the workdir has none). One JSON line per measurement.

  python -m experiments.bench_decode [--lengths=512,2048,8192] [--batches=1,4] [--steps=16]
                                     [--layers=4] [--workdir=runs/tiny] [--max_new_tokens=128]

On CPU the absorbed form trades memory traffic for arithmetic: per cached token it reads C + R
numbers instead of N (H + R + U), but multiplies 2 N C + N R instead of N (H + R + U) (3.4x the
naive FLOPs at these shapes)), so its advantage there is bounded by the machine's FLOP/byte
ratio; the model's weights, read once per step whatever the cache, dilute it at batch 1.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.inference import cache as cache_lib
from deepseek_jax.inference import decode, load, speculative

_LENGTHS = flags.DEFINE_list('lengths', ['512', '2048', '8192'], 'Cache lengths to time.')
_STEPS = flags.DEFINE_integer('steps', 16, 'Timed decode steps per measurement (after warm-up).')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Layers of the MLA-shaped model.')
_BATCHES = flags.DEFINE_list('batches', ['1', '4'], 'Sequences decoded together (each a run).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Activation and cache dtype.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/tiny',
                               'Trained checkpoint for the speculative part.')
_PROMPT = flags.DEFINE_string('prompt', 'The ', 'Prompt of the speculative part.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens of the speculative part.')


def mla_config(layers: int, dtype: str, max_len: int) -> ModelConfig:
  return ModelConfig(vocab_size=1024, hidden_size=2048, num_layers=layers, num_heads=32,
                     qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
                     kv_lora_rank=512, intermediate_size=1408, first_k_dense=layers,
                     n_routed_experts=0, mtp_depth=0, rope_factor=1.0,
                     max_position_embeddings=max(max_len, 4096), dtype=dtype)


def filled_cache(decoder: decode.Decoder, batch: int, max_len: int, length: int):
  """A cache of `max_len` slots holding `length` random tokens per sequence (what is cached
  does not change the work: every step attends over all slots, masked)."""
  def fill(key):
    empty = decoder.init_cache(batch, max_len)
    leaves, treedef = jax.tree.flatten(empty)
    keys = jax.random.split(key, len(leaves))
    leaves = [jax.random.normal(k, a.shape, a.dtype) if a.ndim > 1 else a
              for k, a in zip(keys, leaves)]
    cache = jax.tree.unflatten(treedef, leaves)
    return cache.replace(lengths=jnp.full((batch,), length, jnp.int32))
  return jax.jit(fill)(jax.random.key(0))


def time_decode(model, mode: str, batch: int, max_len: int, steps: int) -> dict:
  """Tokens/s of `steps` greedy decode steps in one `decode.decode_loop` (as `generate` runs
  them), after a warm-up run of the same loop."""
  decoder = decode.Decoder(model, mode=mode)
  cache = filled_cache(decoder, batch, max_len, max_len - 2 * steps - 1)
  key = jax.random.key(0)
  token = jnp.zeros((batch,), jnp.int32)
  run, compile_s = decode.compile_timed(decode.jit_decode_loop, decoder.graphdef,
                                        decoder.sampling, steps, decoder.state, token, cache, key)
  tokens, cache = run(decoder.state, token, cache, key)  # warm-up
  tokens.block_until_ready()
  start = time.perf_counter()
  tokens, cache = run(decoder.state, tokens[:, -1], cache, key)
  tokens.block_until_ready()
  seconds = time.perf_counter() - start
  return dict(part='mla_decode', mode=mode, cache_len=max_len, batch=batch, steps=steps,
              tokens_per_s=batch * steps / seconds, ms_per_step=1e3 * seconds / steps,
              cache_bytes_per_token=cache_lib.bytes_per_token(cache),
              cache_bytes=cache_lib.nbytes(cache), compile_s=compile_s)


def speculative_part(workdir: str, prompt: str, max_new_tokens: int) -> list[dict]:
  try:
    loaded = load.load(workdir)
  except FileNotFoundError as e:
    return [dict(part='speculative', skipped=f'{e}')]
  ids = loaded.tokenizer.encode(prompt)
  rows = []
  for _ in range(2):  # the second run reuses the executables and has its buffers warm
    plain = decode.generate(loaded.model, [ids], max_new_tokens)
    spec = speculative.generate(loaded.model, [ids], max_new_tokens)
  for name, result in (('plain', plain), ('speculative', spec)):
    rows.append(dict(part='speculative', decoding=name, checkpoint=loaded.source,
                     new_tokens=result.new_tokens, tokens_per_s=result.tokens_per_s,
                     acceptance_rate=result.acceptance_rate,
                     same_tokens_as_plain=bool((result.tokens == plain.tokens).all())))
  rows[-1]['speedup'] = spec.tokens_per_s / plain.tokens_per_s
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax warns about its read-only manager
  lengths = [int(n) for n in _LENGTHS.value]
  cfg = mla_config(_LAYERS.value, _DTYPE.value, max(lengths))
  model = model_lib.create(cfg, 0)
  for batch in (int(b) for b in _BATCHES.value):
    for length in lengths:
      rows = {mode: time_decode(model, mode, batch, length, _STEPS.value)
              for mode in ('naive', 'absorbed')}
      for row in rows.values():
        print(json.dumps(row), flush=True)
      print(json.dumps(dict(
          part='mla_ratio', cache_len=length, batch=batch,
          absorbed_speedup=rows['absorbed']['tokens_per_s'] / rows['naive']['tokens_per_s'],
          cache_ratio=rows['naive']['cache_bytes_per_token']
          / rows['absorbed']['cache_bytes_per_token'])), flush=True)
  for row in speculative_part(_WORKDIR.value, _PROMPT.value, _MAX_NEW.value):
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)

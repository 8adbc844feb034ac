"""Prefill and decode with a KV cache: the decoder's own parts around the model's one forward pass.

The model runs T new tokens per sequence against a cache itself (`model(tokens, cache=cache)`,
positions cache.lengths[b] + t; see `deepseek_jax/model.py`). What is the decoder's: allocating the
cache (`inference/cache.py`), moving its lengths, sampling, and the loop. At the jit boundary the
model is split once (`nnx.split`) and `prefill` / `step` are pure functions of (state, arrays),
jitted with the cache donated so its buffers update in place. `generate` drives them: prompts
right-padded into one batch, one prefill, then one jitted step per new token (`Decoder.step`), or
all of them in one `lax.scan` (`decode_loop`, what `generate` uses); each sequence writes at its
own length.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.inference import cache as cache_lib
from deepseek_jax.inference import sampling as sampling_lib

# ---- the forward pass with a cache -------------------------------------------------------------


def at_lengths(x: jax.Array, lengths: jax.Array, offset: int = -1) -> jax.Array:
  """x [B, T, ...] -> x[b, lengths[b] + offset] [B, ...] (default: each prompt's last token)."""
  index = (lengths + offset).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, index, axis=1)[:, 0]


# ---- jitted prefill and decode step ------------------------------------------------------------


def prefill(graphdef: nnx.GraphDef, sampling: sampling_lib.Sampling, state: nnx.State,
            tokens: jax.Array, lengths: jax.Array, cache: cache_lib.Cache, key: jax.Array):
  """Right-padded prompts tokens [B, T] of `lengths` [B] into an empty cache.

  Returns (first new token [B], its logits [B, V], cache with lengths = prompt lengths). The
  padding's keys land beyond each length, where the next steps overwrite them."""
  model = nnx.merge(graphdef, state)
  out = model(tokens, cache=cache.replace(lengths=jnp.zeros_like(lengths)))
  last, cache = at_lengths(out.logits, lengths), out.cache
  token = sampling_lib.sample(last, jax.random.fold_in(key, 0), sampling)
  return token, last, cache.replace(lengths=lengths)


def step(graphdef: nnx.GraphDef, sampling: sampling_lib.Sampling, state: nnx.State,
         token: jax.Array, cache: cache_lib.Cache, key: jax.Array, index: jax.Array):
  """One new token per sequence: token [B] at position lengths[b] -> (next token, logits [B, V],
  cache with lengths + 1). `index` (the step number) seeds the sample."""
  model = nnx.merge(graphdef, state)
  out = model(token[:, None], cache=cache)
  logits, cache = out.logits[:, 0], out.cache
  next_token = sampling_lib.sample(logits, jax.random.fold_in(key, index), sampling)
  return next_token, logits, cache.replace(lengths=cache.lengths + 1)


def decode_loop(graphdef: nnx.GraphDef, sampling: sampling_lib.Sampling, num_steps: int,
                state: nnx.State, token: jax.Array, cache: cache_lib.Cache, key: jax.Array):
  """`num_steps` decode steps in one `lax.scan`: (tokens [B, num_steps] after `token`, cache).
  The heads-major weights are made once, before the loop, and attached to the cache in the body."""
  model = nnx.merge(graphdef, state)
  weights = cache_lib.absorbed_weights([model.block(i).attn for i in range(model.cfg.num_layers)], model.cfg)

  def body(carry, index):
    token, cache = carry
    token, _, cache = step(graphdef, sampling, state, token,
                           cache_lib.with_weights(cache, weights), key, index)
    return (token, cache_lib.with_weights(cache, None)), token

  indices = jnp.arange(1, num_steps + 1, dtype=jnp.int32)
  (_, cache), tokens = jax.lax.scan(body, (token, cache), indices)
  return jnp.transpose(tokens), cache


# Module-level jits with the graph definition and the sampling settings static: a second model
# of the same structure, or a second `generate` call, reuses the compiled executables.
jit_prefill = jax.jit(prefill, static_argnums=(0, 1), donate_argnames='cache')
jit_step = jax.jit(step, static_argnums=(0, 1), donate_argnames='cache')
jit_decode_loop = jax.jit(decode_loop, static_argnums=(0, 1, 2), donate_argnames='cache')


class Decoder:
  """A model split once, with jitted `prefill(tokens, lengths, cache, key)` and
  `step(token, cache, key, index)`; the cache argument is donated to both."""

  def __init__(self, model: model_lib.DeepSeekV3,
               sampling: sampling_lib.Sampling = sampling_lib.Sampling(), mode: str = 'absorbed'):
    if mode not in cache_lib.MODES:
      raise ValueError(f'mode={mode!r}: must be one of {cache_lib.MODES}')
    self.cfg: ModelConfig = model.cfg
    self.mode, self.sampling = mode, sampling
    self.graphdef, self.state = nnx.split(model)

  def init_cache(self, batch: int, max_len: int) -> cache_lib.Cache:
    return cache_lib.init(self.cfg, batch, max_len, self.mode)

  def prefill(self, tokens, lengths, cache, key):
    return jit_prefill(self.graphdef, self.sampling, self.state, tokens, lengths, cache, key)

  def step(self, token, cache, key, index):
    return jit_step(self.graphdef, self.sampling, self.state, token, cache, key,
                    jnp.asarray(index, jnp.int32))


# ---- prompts and generation ---------------------------------------------------------------------


class Generation(NamedTuple):
  tokens: np.ndarray              # [B, max_new_tokens] int32, the new tokens only
  prompt_lengths: np.ndarray      # [B]
  compile_s: float                # tracing and compiling, excluded from the rates below
  prefill_s: float
  decode_s: float
  cache_bytes_per_token: int      # the main model's cache
  acceptance_rate: float | None   # speculative decoding: accepted drafts / drafts
  draft_cache_bytes_per_token: int | None

  @property
  def new_tokens(self) -> int:
    return int(self.tokens.size)

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


def pad_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None,
                cfg: ModelConfig, extra_slots: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """Right-padded prompts [B, T] int32, their lengths [B] and the cache length to use.

  The default cache length is the longest prompt + max_new_tokens (+ `extra_slots`); every
  impossible request fails here with a message naming the value."""
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if not prompts:
    raise ValueError('no prompt given: generation needs at least one prompt')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}: must be at least 1')
  lengths = np.array([len(p) for p in prompts], np.int32)
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f'prompt {i} is empty (0 tokens): decoding needs at least one prompt '
                       'token to predict from')
    if p.min() < 0 or p.max() >= cfg.vocab_size:
      raise ValueError(f'prompt {i} has token ids {p.min()}..{p.max()} outside the vocabulary '
                       f'[0, {cfg.vocab_size})')
  longest = int(lengths.max())
  needed = longest + max_new_tokens + extra_slots
  if max_len is None:
    max_len = needed
  if longest > max_len:
    raise ValueError(f'prompt {int(lengths.argmax())} has {longest} tokens, longer than the '
                     f'cache (max_len={max_len})')
  if needed > max_len:
    raise ValueError(f'the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens}'
                     + (f' + {extra_slots} draft slot(s)' if extra_slots else '')
                     + f' = {needed} exceeds the cache (max_len={max_len})')
  if max_len > cfg.max_position_embeddings:
    raise ValueError(f'max_len={max_len} exceeds the model\'s max_position_embeddings='
                     f'{cfg.max_position_embeddings}')
  padded = np.zeros((len(prompts), longest), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  return padded, lengths, max_len


def compile_timed(jitted, *args):
  """(compiled function of the non-static arguments, seconds spent tracing and compiling; ~0
  when the same jit has compiled for the same static values and shapes before)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _on_mesh(mesh: jax.sharding.Mesh | None, tokens: np.ndarray, lengths: np.ndarray):
  """Prompts padded to whole rows per device (copies of the first prompt, dropped afterwards),
  and the context that places and runs them on `mesh` (nothing without one)."""
  if mesh is None:
    return tokens, lengths, contextlib.nullcontext()
  extra = -len(lengths) % math.prod(mesh.shape[a] for a in sharding.BATCH)
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], extra, axis=0)])
  lengths = np.concatenate([lengths, np.repeat(lengths[:1], extra)])
  return tokens, lengths, jax.set_mesh(mesh)  # the MoE dispatches over the ambient mesh


def generate(model: model_lib.DeepSeekV3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, sampling: sampling_lib.Sampling = sampling_lib.Sampling(),
             mode: str = 'absorbed', max_len: int | None = None, seed: int = 0,
             mesh: jax.sharding.Mesh | None = None) -> Generation:
  """Plain decoding: `max_new_tokens` tokens after each prompt (no early stop).

  With `mesh`, the model's weights as they are placed (`load.load(..., mesh=...)`), the prompts,
  their lengths and the cache split over the batch axes (the batch padded to a multiple of
  data x expert x plane); the MoE runs expert-parallel as in training."""
  tokens, lengths, max_len = pad_prompts(prompts, max_new_tokens, max_len, model.cfg)
  B = len(lengths)
  tokens, lengths, context = _on_mesh(mesh, tokens, lengths)
  decoder = Decoder(model, sampling, mode)
  rows = len(lengths)  # B, or B padded to whole rows per device
  with context:
    make_cache = lambda: decoder.init_cache(rows, max_len)
    if mesh is None:
      cache = make_cache()
      first_spec = jax.ShapeDtypeStruct((rows,), jnp.int32)
      tokens, lengths, key = jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed)
    else:
      cache = jax.jit(make_cache, out_shardings=cache_lib.shardings(
          jax.eval_shape(make_cache), mesh))()
      split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH))
      first_spec = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split)
      # every process holds all prompts: each places its devices' rows (one process or several)
      place = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index])
      tokens, lengths = place(tokens, sharding.batch_sharding(mesh)), place(lengths, split)
      key = jax.jit(lambda: jax.random.key(seed), out_shardings=sharding.replicated(mesh))()
    statics = (decoder.graphdef, sampling)
    run_prefill, prefill_compile = compile_timed(jit_prefill, *statics, decoder.state, tokens,
                                                 lengths, cache, key)
    run_loop, loop_compile = compile_timed(jit_decode_loop, *statics, max_new_tokens - 1,
                                           decoder.state, first_spec, cache, key)
    start = time.perf_counter()
    first, _, cache = run_prefill(decoder.state, tokens, lengths, cache, key)
    first.block_until_ready()
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    rest, cache = run_loop(decoder.state, first, cache, key)
    new = sharding.to_host(jnp.concatenate([first[:, None], rest], axis=1))
    decode_s = time.perf_counter() - start
  return Generation(new[:B], sharding.to_host(lengths)[:B], prefill_compile + loop_compile, prefill_s,
                    decode_s, cache_lib.bytes_per_token(cache), None, None)

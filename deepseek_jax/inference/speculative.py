"""Speculative decoding with the first MTP module as the drafter (V3 §2.2 and §5.4.3).

After the main model has produced token t_{m} from position m-1, the MTP module at position m-1,
given h_{m-1} (the main model's hidden state before the final norm) and Emb(t_m), drafts d_{m+1}.
One main forward pass over [t_m, d_{m+1}] at positions m, m+1 then verifies the draft and yields
the token after it:
  - logits at m predict t_{m+1}; the draft is accepted when it is that token (greedy), or by the
    speculative-sampling rule (accept with probability min(1, p(d) / q(d)), else draw from
    normalise(max(0, p - q)); Leviathan et al. 2023, Chen et al. 2023), which leaves the output
    distribution exactly that of plain sampling;
  - if accepted, logits at m+1 give t_{m+2} as well: two tokens for one pass.
The main cache keeps what it wrote at m+1 only if the draft was accepted: rollback is setting
each sequence's length to m + 1 + accepted. The MTP module has its own attention layer and so
its own one-layer cache; it runs once per step over the same two positions with Emb of the two
committed tokens after them, and keeps the same lengths. With greedy sampling the output equals
plain greedy decoding token for token.

Only the first MTP module drafts (one draft token per step), as in the paper's evaluation.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from deepseek_jax import model as model_lib
from deepseek_jax.inference import cache as cache_lib
from deepseek_jax.inference import decode
from deepseek_jax.inference import sampling as sampling_lib


@struct.dataclass
class SpecState:
  cache: cache_lib.Cache        # main model, lengths m (positions 0..m-1 processed)
  draft_cache: cache_lib.Cache  # the MTP module's attention layer, same lengths
  pending: jax.Array            # [B] t_m: committed, not yet run through the main model
  draft: jax.Array              # [B] d_{m+1}
  draft_probs: jax.Array        # [B, V] q, the draft's distribution ([B, 1] zeros when greedy)
  out: jax.Array                # [B, max_new + 1] committed new tokens
  count: jax.Array              # [B] tokens in `out`
  proposed: jax.Array           # [B] drafts verified while the sequence was still generating
  accepted: jax.Array           # [B] of those, accepted


def accept_or_resample(p: jax.Array, q: jax.Array, draft: jax.Array,
                       key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The speculative-sampling rule: (token [B], accepted [B] bool) for drafts [B] ~ q [B, V].

  The token is distributed as p whatever q is: P(x) = q(x) min(1, p(x)/q(x)) + P(reject)
  normalise(max(0, p - q))(x) = p(x)."""
  accept_key, resample_key = jax.random.split(key)
  p_draft = jnp.take_along_axis(p, draft[:, None], axis=1)[:, 0]
  q_draft = jnp.take_along_axis(q, draft[:, None], axis=1)[:, 0]
  u = jax.random.uniform(accept_key, draft.shape, jnp.float32)
  accepted = u * q_draft < p_draft  # u < p/q, without dividing (q(d) > 0: d was drawn from q)
  residual = jnp.maximum(p - q, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  # mass 0 means p == q, where a rejection has probability 0: any valid fallback will do.
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)
  resampled = sampling_lib.from_probabilities(residual, resample_key)
  return jnp.where(accepted, draft, resampled), accepted


def _make_draft(logits: jax.Array, key: jax.Array, sampling: sampling_lib.Sampling):
  """MTP logits [B, V] -> (draft [B], its distribution [B, V], or [B, 1] zeros when greedy)."""
  if sampling.greedy:
    return (jnp.argmax(logits, axis=-1).astype(jnp.int32),
            jnp.zeros((logits.shape[0], 1), jnp.float32))
  q = sampling_lib.probabilities(logits, sampling)
  return sampling_lib.from_probabilities(q, key), q


def prefill(graphdef: nnx.GraphDef, sampling: sampling_lib.Sampling, max_new_tokens: int,
            state: nnx.State, tokens: jax.Array, lengths: jax.Array, cache: cache_lib.Cache,
            draft_cache: cache_lib.Cache, key: jax.Array) -> SpecState:
  """Prompts [B, T] of `lengths` -> the first new token t_n and the first draft d_{n+1}."""
  model = nnx.merge(graphdef, state)
  B = tokens.shape[0]
  rows = jnp.arange(B, dtype=jnp.int32)
  zeros = jnp.zeros_like(lengths)
  out = model(tokens, cache=cache.replace(lengths=zeros))
  logits, hidden, cache = out.logits, out.hidden, out.cache
  first_key, draft_key = jax.random.split(jax.random.fold_in(key, 0))
  first = sampling_lib.sample(decode.at_lengths(logits, lengths), first_key, sampling)
  # MTP position i takes t_{i+1}: the prompt shifted left, then t_n at each prompt's last position.
  next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros((B, 1), tokens.dtype)], axis=1)
  next_tokens = next_tokens.at[rows, lengths - 1].set(first)
  mtp = model.mtp_forward(1, hidden, next_tokens, cache=draft_cache.replace(lengths=zeros))
  draft_cache = mtp.cache
  draft, q = _make_draft(decode.at_lengths(mtp.logits, lengths), draft_key, sampling)
  out = jnp.zeros((B, max_new_tokens + 1), jnp.int32).at[:, 0].set(first)
  return SpecState(cache=cache.replace(lengths=lengths),
                   draft_cache=draft_cache.replace(lengths=lengths), pending=first, draft=draft,
                   draft_probs=q, out=out, count=jnp.ones((B,), jnp.int32), proposed=zeros,
                   accepted=zeros)


def step(graphdef: nnx.GraphDef, sampling: sampling_lib.Sampling, max_new_tokens: int,
         state: nnx.State, spec: SpecState, key: jax.Array, index: jax.Array) -> SpecState:
  """Verify the draft and draft again: 1 or 2 new tokens per sequence still generating."""
  model = nnx.merge(graphdef, state)
  B = spec.pending.shape[0]
  rows = jnp.arange(B, dtype=jnp.int32)
  verify_key, bonus_key, draft_key = jax.random.split(jax.random.fold_in(key, index), 3)
  pair = jnp.stack([spec.pending, spec.draft], axis=1)  # [B, 2] at positions m, m+1
  out = model(pair, cache=spec.cache)
  logits, hidden, cache = out.logits, out.hidden, out.cache
  if sampling.greedy:
    first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    accepted = first == spec.draft
    second = jnp.argmax(logits[:, 1], axis=-1).astype(jnp.int32)
  else:
    p = sampling_lib.probabilities(logits[:, 0], sampling)
    first, accepted = accept_or_resample(p, spec.draft_probs, spec.draft, verify_key)
    second = sampling_lib.sample(logits[:, 1], bonus_key, sampling)
  active = spec.count < max_new_tokens  # finished sequences stay frozen
  accepted &= active
  num_new = jnp.where(active, 1 + accepted.astype(jnp.int32), 0)
  # The MTP module at m, m+1 sees Emb(t_{m+1}), Emb(t_{m+2}); position m+1 only counts if accepted.
  mtp = model.mtp_forward(1, hidden, jnp.stack([first, second], 1), cache=spec.draft_cache)
  draft_cache = mtp.cache
  draft, q = _make_draft(decode.at_lengths(mtp.logits, accepted.astype(jnp.int32), offset=0),
                         draft_key, sampling)
  width = spec.out.shape[1]  # an index of `width` is dropped
  out = spec.out.at[rows, jnp.where(active, spec.count, width)].set(first, mode='drop')
  out = out.at[rows, jnp.where(accepted, spec.count + 1, width)].set(second, mode='drop')
  return SpecState(
      cache=cache.replace(lengths=spec.cache.lengths + num_new),
      draft_cache=draft_cache.replace(lengths=spec.draft_cache.lengths + num_new),
      pending=jnp.where(active, jnp.where(accepted, second, first), spec.pending),
      draft=jnp.where(active, draft, spec.draft),
      draft_probs=jnp.where(active[:, None], q, spec.draft_probs),
      out=out, count=spec.count + num_new,
      proposed=spec.proposed + active.astype(jnp.int32),
      accepted=spec.accepted + accepted.astype(jnp.int32))


def decode_loop(graphdef: nnx.GraphDef, sampling: sampling_lib.Sampling, max_new_tokens: int,
                state: nnx.State, spec: SpecState, key: jax.Array) -> SpecState:
  """Steps in one `lax.while_loop` until every sequence has `max_new_tokens` (at most
  max_new_tokens - 1 steps: each emits at least one token per sequence)."""

  def cond(carry):
    return jnp.min(carry[0].count) < max_new_tokens

  model = nnx.merge(graphdef, state)  # heads-major weights made once, attached in the body
  main = cache_lib.absorbed_weights([model.block(i).attn for i in range(model.cfg.num_layers)], model.cfg)
  draft = cache_lib.absorbed_weights([model.mtp[0].block.attn], model.cfg)

  def attach(spec, main, draft):
    return spec.replace(cache=cache_lib.with_weights(spec.cache, main),
                        draft_cache=cache_lib.with_weights(spec.draft_cache, draft))

  def body(carry):
    spec, index = carry
    spec = step(graphdef, sampling, max_new_tokens, state, attach(spec, main, draft), key, index)
    return attach(spec, None, None), index + 1

  spec, _ = jax.lax.while_loop(cond, body, (spec, jnp.int32(1)))
  return spec


jit_prefill = jax.jit(prefill, static_argnums=(0, 1, 2), donate_argnames=('cache', 'draft_cache'))
jit_decode_loop = jax.jit(decode_loop, static_argnums=(0, 1, 2), donate_argnames='spec')


def generate(model: model_lib.DeepSeekV3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, sampling: sampling_lib.Sampling = sampling_lib.Sampling(),
             mode: str = 'absorbed', max_len: int | None = None,
             seed: int = 0) -> decode.Generation:
  """`decode.generate` with MTP drafts; `acceptance_rate` = accepted / verified drafts."""
  cfg = model.cfg
  if cfg.mtp_depth < 1:
    raise ValueError('speculative decoding drafts with the MTP module, but the model has '
                     'mtp_depth=0')
  if mode not in cache_lib.MODES:
    raise ValueError(f'mode={mode!r}: must be one of {cache_lib.MODES}')
  tokens, lengths, max_len = decode.pad_prompts(prompts, max_new_tokens, max_len, cfg)
  B = len(lengths)
  graphdef, state = nnx.split(model)
  cache = cache_lib.init(cfg, B, max_len, mode)
  draft_cache = cache_lib.init(cfg, B, max_len, mode, num_layers=1)
  key = jax.random.key(seed)
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  statics = (graphdef, sampling, max_new_tokens)
  run_prefill, prefill_compile = decode.compile_timed(
      jit_prefill, *statics, state, tokens, lengths, cache, draft_cache, key)
  spec_shape = jax.eval_shape(functools.partial(prefill, *statics), state, tokens, lengths,
                              cache, draft_cache, key)
  run_loop, loop_compile = decode.compile_timed(jit_decode_loop, *statics, state, spec_shape,
                                                key)
  start = time.perf_counter()
  spec = run_prefill(state, tokens, lengths, cache, draft_cache, key)
  spec.count.block_until_ready()
  prefill_s = time.perf_counter() - start
  start = time.perf_counter()
  spec = run_loop(state, spec, key)
  new = np.asarray(jax.device_get(spec.out[:, :max_new_tokens]))
  decode_s = time.perf_counter() - start
  proposed, accepted = int(jnp.sum(spec.proposed)), int(jnp.sum(spec.accepted))
  return decode.Generation(new, np.asarray(lengths), prefill_compile + loop_compile, prefill_s,
                           decode_s, cache_lib.bytes_per_token(spec.cache),
                           accepted / proposed if proposed else None,
                           cache_lib.bytes_per_token(spec.draft_cache))

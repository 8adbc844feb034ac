"""Latent-attention decode as a Pallas kernel (FlashMLA-style, flash-decoding split over the cache).

Semantics are `kernels.reference.mla_decode`'s: absorbed queries q_latent [B, Tq, N, C] and
q_rope [B, Tq, N, R] against the latent cache c_kv [B, S, C] and the shared rope key k_rope
[B, S, R]; `lengths[b]` counts the cached tokens including the Tq new ones, and query t sees the
first lengths[b] - (Tq - 1 - t) slots (FlashMLA's convention; Tq = 2 is the MTP verify step).
The latent c_kv is both key and value: o = softmax(scale (q_latent c_kv^T + q_rope k_rope^T)) c_kv.

Layout. The Tq x N queries of one sequence share its cache, so they are the rows of each tile:
Z = Tq x N rows, row z = t N + n, cut into blocks of `block_rows`. The cache length is cut into
`num_splits` chunks (flash-decoding), each handled by its own program, so a small batch still
fills the machine. The grid is (B, Z / block_rows, num_splits); a program loops over its
chunk's slots `block_s` at a time with the online softmax (running max m, sum l, FP32
accumulator), stopping at the sequence's length, and writes its normalised partial output and
log-sum-exp; `combine` merges the chunks by their log-sum-exps. A query that sees no slot gets
o = 0 and lse = -inf.

The cache's BlockSpecs cover a whole chunk and the loop slices it with `pl.ds` (the layout of
Pallas' Triton kernels), so nothing beyond `lengths[b]` is read on a GPU. Triton needs
power-of-two tile shapes and dot dimensions of at least 16: `check` enforces that for C and R
under the 'pallas' switch on every backend, so the CPU tests exercise what a GPU would run.

Paged cache (`block_table`, vLLM / FlashMLA style, page size 64 by default): the caches are
pools of pages and a block table per sequence lists its pages; the loop step is one page, read
through the table, and everything else is the same kernel.

What ran: interpret mode on CPU only (tests/test_kernels_mla.py, the decode tests). No session
has had a GPU yet, so the Triton lowering and its speed are untested (`bench_kernels`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

KERNEL_CHOICES = ('auto', 'pallas', 'xla')
BLOCK_S = 64  # cache slots per loop step (FlashMLA's block); caches for the kernel align to it
MAX_AUTO_QUERIES = 2  # 'auto' runs the kernel for decode (Tq = 1) and MTP verify (Tq = 2) only


def check(num_latent: int, num_rope: int) -> None:
  """The shapes the kernel takes: C and R powers of two, at least 16 (Triton tiles and dots)."""
  for name, size in (('kv_lora_rank C', num_latent), ('qk_rope_head_dim R', num_rope)):
    if size < 16 or size & (size - 1):
      raise ValueError(f'mla_decode kernel: {name}={size} must be a power of two >= 16 (Triton '
                       "tile shapes); use mla_decode_kernel='xla' for this model")


def use_kernel(choice: str, num_queries: int, num_latent: int, num_rope: int) -> bool:
  """Whether the `mla_decode_kernel` switch sends a call to the kernel: 'xla' never, 'pallas'
  always (raising if the shapes do not fit), 'auto' on a GPU for Tq <= 2 when the shapes fit.
  TPU stays on XLA under 'auto': the kernel's layout is Triton's and has not run on a TPU."""
  if choice not in KERNEL_CHOICES:
    raise ValueError(f'mla_decode_kernel={choice!r}: must be one of {KERNEL_CHOICES}')
  if choice == 'xla':
    return False
  if choice == 'pallas':
    check(num_latent, num_rope)
    return True
  if jax.default_backend() != 'gpu' or num_queries > MAX_AUTO_QUERIES:
    return False
  try:
    check(num_latent, num_rope)
  except ValueError:
    return False
  return True


def mla_decode(q_latent: jax.Array, q_rope: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
               lengths: jax.Array, scale: float, *, block_table: jax.Array | None = None,
               block_rows: int = 64, block_s: int = BLOCK_S, num_splits: int | None = None,
               interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """-> (o [B, Tq, N, C] in q_latent's dtype, lse [B, Tq, N] float32); see the module docstring.

  block_table: a paged cache. c_kv [P, page, C] and k_rope [P, page, R] are then pools of P pages
  and block_table [B, pages] int32 lists each sequence's pages in order (slot s of sequence b is
  row s % page of page block_table[b, s // page]); entries past a sequence's length are never
  read. The page size is the loop step (block_s is ignored).
  block_rows: query rows (Tq x N, padded) per tile; block_s: cache slots per loop step;
  num_splits: chunks of the cache per sequence (default: enough programs to fill ~256 slots of
  a GPU). interpret: Pallas interpret mode; default on CPU only.
  """
  B, Tq, N, C = q_latent.shape
  R = k_rope.shape[-1]
  if block_table is None:
    S = c_kv.shape[1]
    expected = ((B, S, C), (B, S, R))
  else:
    if block_table.ndim != 2 or block_table.shape[0] != B:
      raise ValueError(f'mla_decode: block_table {block_table.shape} must be [B, pages] with '
                       f'B = {B}')
    P, block_s = c_kv.shape[:2]
    S = block_table.shape[1] * block_s
    expected = ((P, block_s, C), (P, block_s, R))
  if q_rope.shape != (B, Tq, N, R) or (c_kv.shape, k_rope.shape) != expected:
    raise ValueError(f'mla_decode: shapes do not agree: q_latent {q_latent.shape}, q_rope '
                     f'{q_rope.shape}, c_kv {c_kv.shape}, k_rope {k_rope.shape}'
                     + ('' if block_table is None else f', block_table {block_table.shape}'))
  if lengths.shape != (B,):
    raise ValueError(f'mla_decode: lengths {lengths.shape} must be [B] = ({B},)')
  check(C, R)
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  Z = Tq * N
  block_rows = min(block_rows, max(16, pl.next_power_of_2(Z)))
  row_blocks = pl.cdiv(Z, block_rows)
  s_blocks = pl.cdiv(S, block_s)
  if num_splits is None:  # ~256 programs, in chunks that divide the cache (no padding below)
    target = max(1, min(s_blocks, pl.cdiv(256, B * row_blocks)))
    num_splits = max(d for d in range(1, target + 1) if s_blocks % d == 0)
  num_splits = max(1, min(num_splits, s_blocks))
  steps_per_split = pl.cdiv(s_blocks, num_splits)
  chunk = steps_per_split * block_s
  q = _pad_axis(q_latent.reshape(B, Z, C), 1, row_blocks * block_rows)
  qr = _pad_axis(q_rope.reshape(B, Z, R), 1, row_blocks * block_rows)
  if block_table is None:
    # A cache of a multiple of block_s slots (as `inference.cache.init` allocates them for the
    # kernel) is used as it is; otherwise this pads, a copy of the whole cache.
    c_kv = _pad_axis(c_kv, 1, num_splits * chunk)
    k_rope = _pad_axis(k_rope, 1, num_splits * chunk)
    cache_specs = [pl.BlockSpec((None, chunk, C), lambda b, r, j: (b, j, 0)),  # c_kv chunk
                   pl.BlockSpec((None, chunk, R), lambda b, r, j: (b, j, 0))]  # k_rope chunk
    cache_args = (c_kv, k_rope)
  else:
    # the whole pool is visible to every program, which reads only the pages its chunk of the
    # block table names
    table = _pad_axis(block_table.astype(jnp.int32), 1, num_splits * steps_per_split)
    cache_specs = [pl.BlockSpec(c_kv.shape, lambda b, r, j: (0, 0, 0)),
                   pl.BlockSpec(k_rope.shape, lambda b, r, j: (0, 0, 0)),
                   pl.BlockSpec((None, steps_per_split), lambda b, r, j: (b, j))]
    cache_args = (c_kv, k_rope, table)
  kernel = functools.partial(_kernel, scale=scale, num_queries=Tq, num_heads=N, block_s=block_s,
                             chunk=chunk, paged=block_table is not None)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, row_blocks, num_splits),
      in_specs=[
          pl.BlockSpec((1,), lambda b, r, j: (b,)),                       # lengths
          pl.BlockSpec((None, block_rows, C), lambda b, r, j: (b, r, 0)),  # q_latent rows
          pl.BlockSpec((None, block_rows, R), lambda b, r, j: (b, r, 0)),  # q_rope rows
      ] + cache_specs,
      out_specs=[
          pl.BlockSpec((None, None, block_rows, C), lambda b, r, j: (b, j, r, 0)),
          pl.BlockSpec((None, None, block_rows), lambda b, r, j: (b, j, r)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, num_splits, row_blocks * block_rows, C), jnp.float32),
          jax.ShapeDtypeStruct((B, num_splits, row_blocks * block_rows), jnp.float32),
      ],
      interpret=interpret,
      name='mla_decode',
  )(lengths.astype(jnp.int32), q, qr, *cache_args)
  o, lse = combine(o, lse)  # [B, Zp, C], [B, Zp]
  return (o[:, :Z].reshape(B, Tq, N, C).astype(q_latent.dtype), lse[:, :Z].reshape(B, Tq, N))


def _kernel(lengths_ref, q_ref, qr_ref, c_ref, kr_ref, *refs, scale: float, num_queries: int,
            num_heads: int, block_s: int, chunk: int, paged: bool):
  """One (sequence, row block, chunk): q [rows, C], qr [rows, R] over the chunk's slots, from
  c [chunk, C], kr [chunk, R], or, paged, from the pools [P, page, C], [P, page, R] through the
  chunk's block-table entries table [chunk / page]."""
  table_ref, o_ref, lse_ref = refs if paged else (None, *refs)
  rows = q_ref.shape[0]
  length = lengths_ref[0]
  row = pl.program_id(1) * rows + jnp.arange(rows, dtype=jnp.int32)
  t = row // num_heads
  sees = length - (num_queries - 1 - t)  # [rows]: slots this row's query may read
  start = pl.program_id(2) * chunk
  steps = jnp.clip(pl.cdiv(length - start, block_s), 0, chunk // block_s)
  q, qr = q_ref[...], qr_ref[...]

  def step(i, carry):
    acc, m, l = carry
    if paged:
      page = table_ref[i]
      c, kr = c_ref[page], kr_ref[page]  # [page, C], [page, R]
    else:
      slots = pl.ds(pl.multiple_of(i * block_s, block_s), block_s)
      c, kr = c_ref[slots, :], kr_ref[slots, :]  # [block_s, C], [block_s, R]
    s = (jnp.dot(q, c.T, preferred_element_type=jnp.float32)
         + jnp.dot(qr, kr.T, preferred_element_type=jnp.float32)) * scale  # [rows, block_s]
    slot = start + i * block_s + jnp.arange(block_s, dtype=jnp.int32)
    s = jnp.where(slot[None, :] < sees[:, None], s, -jnp.inf)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row with nothing seen yet
    correction = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = correction * l + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + jnp.dot(p.astype(c.dtype), c,
                                              preferred_element_type=jnp.float32)
    return acc, m_next, l

  acc, m, l = jax.lax.fori_loop(
      0, steps, step, (jnp.zeros(o_ref.shape, jnp.float32),
                       jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32)))
  seen = l > 0
  o_ref[...] = acc / jnp.where(seen, l, 1.0)[:, None]
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def combine(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Chunks' normalised outputs o [B, K, Z, C] and log-sum-exps lse [B, K, Z] -> the whole
  cache's (o [B, Z, C], lse [B, Z]): each chunk weighted by exp(lse_k - lse). Rows no chunk saw
  stay o = 0, lse = -inf."""
  top = jnp.max(lse, axis=1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weight = jnp.exp(lse - top)  # 0 for empty chunks
  total = jnp.sum(weight, axis=1)  # [B, Z]
  seen = total > 0
  o = jnp.einsum('BKZ,BKZC->BZC', weight, o) / jnp.where(seen, total, 1.0)[..., None]
  return o, jnp.where(seen, top[:, 0] + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)

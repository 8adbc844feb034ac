"""Latent-attention decode as a Pallas kernel (FlashMLA-style, flash-decoding split over the cache):
`mla_decode`, which runs this module's Triton-layout kernel on GPUs (and, interpreted, on CPU)
and `kernels/mla_decode_tpu.py`'s Mosaic-layout kernel on TPUs (`backend`, `kernels.platform`).

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
under the 'pallas' switch (and for backend None, which traces both kernels), so the CPU tests
exercise what a GPU would run. The call passes Triton's compiler parameters explicitly: JAX 0.10
lowers a GPU pallas_call without them through Mosaic GPU.

Paged cache (`block_table`, vLLM / FlashMLA style, page size 64 by default): the caches are
pools of pages and a block table per sequence lists its pages; the loop step is one page, read
through the table, and everything else is the same kernel.

What ran: interpret mode on CPU (tests/test_kernels_mla.py) and lowering for CUDA through Triton
(tests/test_kernels_lowering.py: the module holds the Triton call). No session has had a GPU,
so no PTX was built and the speed is unknown (`bench_kernels`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels import mla_decode_tpu, platform, tiles

KERNEL_CHOICES = ('auto', 'pallas', 'xla')
BACKENDS = platform.BACKENDS
BLOCK_S = 64  # cache slots per loop step (FlashMLA's block); caches for the kernel align to it
MAX_AUTO_QUERIES = 2  # 'auto' runs the kernel for decode (Tq = 1) and MTP verify (Tq = 2) only


def check(num_latent: int, num_rope: int, backend: str | None = 'triton') -> None:
  """The shapes a backend's kernel takes. Triton: C and R powers of two, at least 16 (its tile
  shapes and dots). Mosaic TPU: any (C and R are whole in every block). None: both, as the
  platform picks the kernel at lowering time."""
  platform.check_backend(backend, 'mla_decode')
  if backend == 'mosaic_tpu':
    return
  for name, size in (('kv_lora_rank C', num_latent), ('qk_rope_head_dim R', num_rope)):
    if size < 16 or size & (size - 1):
      raise ValueError(f'mla_decode kernel: {name}={size} must be a power of two >= 16 (Triton '
                       "tile shapes); use mla_decode_kernel='xla' for this model")


def supported(num_queries: int, num_latent: int, num_rope: int, backend: str | None) -> bool:
  """Whether 'auto' should send a call with these shapes to `backend`'s kernel: the kernel takes
  them (`check`) and Tq <= MAX_AUTO_QUERIES (decode and the MTP verify step)."""
  if num_queries > MAX_AUTO_QUERIES:
    return False
  try:
    check(num_latent, num_rope, backend)
  except ValueError:
    return False
  return True


def use_kernel(choice: str, num_queries: int, num_latent: int, num_rope: int) -> bool:
  """Whether the `mla_decode_kernel` switch sends a call to the kernel: 'xla' never, 'pallas'
  always (raising if the shapes do not fit), 'auto' on a GPU (Triton) or a TPU (Mosaic) when
  `supported`. The host's backend decides 'auto'; a program compiled ahead of time for a TPU
  from a CPU host takes the kernel under 'pallas' (`mla_decode` then picks Mosaic by the
  platform being lowered for)."""
  if choice not in KERNEL_CHOICES:
    raise ValueError(f'mla_decode_kernel={choice!r}: must be one of {KERNEL_CHOICES}')
  if choice == 'xla':
    return False
  if choice == 'pallas':
    check(num_latent, num_rope)
    return True
  backend = platform.host_backend()
  return backend is not None and supported(num_queries, num_latent, num_rope, backend)


def mla_decode(q_latent: jax.Array, q_rope: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
               lengths: jax.Array, scale: float, *, block_table: jax.Array | None = None,
               backend: str | None = None, block_rows: int | None = None,
               block_s: int | None = None, num_splits: int | None = None,
               interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """-> (o [B, Tq, N, C] in q_latent's dtype, lse [B, Tq, N] float32); see the module docstring.

  block_table: a paged cache. c_kv [pages, page, C] and k_rope [pages, page, R] are then pools
  of pages and block_table [B, pages] int32 lists each sequence's pages in order (slot s of
  sequence b is row s % page of page block_table[b, s // page]); entries past a sequence's length
  are never read. The page size is the loop step (block_s is ignored).
  backend: 'triton' (this module's kernel), 'mosaic_tpu' (`kernels/mla_decode_tpu.py`) or None:
  picked by the platform being lowered for (`jax.lax.platform_dependent`: Mosaic on TPU, Triton
  elsewhere), so a program compiled ahead of time for a TPU from a CPU host gets the TPU kernel.
  interpret: None compiles the kernel, except on CPU, where it runs in interpret mode (Pallas'
  generic interpreter for Triton, its TPU interpret mode for Mosaic); True / False force it.
  block_rows: query rows (Tq x N, padded) per tile (Triton: 64; Mosaic: all rows up to 256);
  block_s: cache slots per step (Triton: 64; Mosaic: the largest of 512, 256, 128, 64 dividing
  S); num_splits: chunks of the cache per sequence (Triton: enough programs to fill ~256 slots
  of a GPU; Mosaic: 1, or 2 when there is one program, for a second TensorCore).
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
    P, page = c_kv.shape[:2]
    expected = ((P, page, C), (P, page, R))
  if q_rope.shape != (B, Tq, N, R) or (c_kv.shape, k_rope.shape) != expected:
    raise ValueError(f'mla_decode: shapes do not agree: q_latent {q_latent.shape}, q_rope '
                     f'{q_rope.shape}, c_kv {c_kv.shape}, k_rope {k_rope.shape}'
                     + ('' if block_table is None else f', block_table {block_table.shape}'))
  if lengths.shape != (B,):
    raise ValueError(f'mla_decode: lengths {lengths.shape} must be [B] = ({B},)')
  check(C, R, backend)
  args = (q_latent, q_rope, c_kv, k_rope, lengths)
  options = dict(scale=scale, block_table=block_table, block_rows=block_rows, block_s=block_s,
                 num_splits=num_splits)
  axes = platform.partitioned_axes()
  if axes and block_table is not None:
    raise ValueError(f'mla_decode: a paged cache on a mesh partitioned over {axes} is not '
                     'supported (each device would need the whole pool)')
  if not splits_batch(B):
    raise ValueError(f'mla_decode: batch {B} does not split evenly over the mesh axes {axes}')

  def per_device(kernel):  # compiled kernels run per device, on its rows of the batch
    def run(interpret):
      call = functools.partial(kernel, interpret=interpret, **options)
      if not axes or interpret:  # no mesh to split; interpreted kernels are plain XLA ops
        return call(*args)
      rows = jax.sharding.PartitionSpec(axes)  # every mesh axis manual: Mosaic insists
      return jax.shard_map(call, in_specs=(rows,) * len(args), out_specs=(rows, rows))(*args)
    return run

  return platform.dispatch(backend, interpret, per_device(_triton), per_device(_mosaic_tpu))


def splits_batch(batch: int) -> bool:
  """Whether `mla_decode` can run here on a batch of this size: on one device, or on a mesh whose
  partitioned axes (`platform.partitioned_axes`) divide it, one block of rows per device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not batch % math.prod(mesh.shape[a] for a in platform.partitioned_axes())


def _rows(q_latent, q_rope, rows: int):
  """Queries as rows: [B, Tq, N, ...] -> [B, Z, ...], row z = t N + n, zero-padded to `rows`."""
  B, Tq, N, _ = q_latent.shape
  return (_pad_axis(q_latent.reshape(B, Tq * N, -1), 1, rows),
          _pad_axis(q_rope.reshape(B, Tq * N, -1), 1, rows))


def _finish(o, lse, q_latent):
  """Chunks' partials [B, W, Zp, C], [B, W, Zp] -> (o [B, Tq, N, C], lse [B, Tq, N])."""
  B, Tq, N, C = q_latent.shape
  Z = Tq * N
  o, lse = combine(o, lse)  # [B, Zp, C], [B, Zp]
  return (o[:, :Z].reshape(B, Tq, N, C).astype(q_latent.dtype), lse[:, :Z].reshape(B, Tq, N))


def _mosaic_tpu(q_latent, q_rope, c_kv, k_rope, lengths, *, scale, block_table, block_rows,
                block_s, num_splits, interpret):
  """The TPU kernel (`kernels/mla_decode_tpu.py`) on padded rows and cache."""
  B, Tq, N, _ = q_latent.shape
  paged = block_table is not None  # c_kv.shape[1]: the cache's slots, or the page size
  block_rows, rows, block_s, slots = mla_decode_tpu.block_sizes(
      Tq * N, c_kv.shape[1], block_rows, c_kv.shape[1] if paged else block_s)
  q, qr = _rows(q_latent, q_rope, rows)
  if not paged:  # a cache of a multiple of block_s slots is used as it is
    c_kv, k_rope = _pad_axis(c_kv, 1, slots), _pad_axis(k_rope, 1, slots)
  o, lse = mla_decode_tpu.partials(q, qr, c_kv, k_rope, lengths, scale, num_queries=Tq,
                                   num_heads=N, block_table=block_table, block_rows=block_rows,
                                   block_s=block_s, num_splits=num_splits, interpret=interpret)
  return _finish(o, lse, q_latent)


def _triton(q_latent, q_rope, c_kv, k_rope, lengths, *, scale, block_table, block_rows,
            block_s, num_splits, interpret):
  """This module's kernel, in Triton's layout (see the module docstring)."""
  B, Tq, N, C = q_latent.shape
  R = k_rope.shape[-1]
  block_rows = 64 if block_rows is None else block_rows
  block_s = BLOCK_S if block_s is None else block_s
  if block_table is None:
    S = c_kv.shape[1]
  else:
    block_s = c_kv.shape[1]  # the page
    S = block_table.shape[1] * block_s
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
  q, qr = _rows(q_latent, q_rope, row_blocks * block_rows)
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
          tiles.out_struct((B, num_splits, row_blocks * block_rows, C), jnp.float32, q, c_kv),
          tiles.out_struct((B, num_splits, row_blocks * block_rows), jnp.float32, q, c_kv),
      ],
      interpret=interpret,
      # Explicitly Triton: since JAX 0.10 a GPU pallas_call without compiler parameters is
      # lowered by Mosaic GPU, for which this kernel was not written.
      compiler_params=None if interpret else pl_triton.CompilerParams(),
      name='mla_decode',
  )(lengths.astype(jnp.int32), q, qr, *cache_args)
  return _finish(o, lse, q_latent)


def _kernel(lengths_ref, q_ref, qr_ref, c_ref, kr_ref, *refs, scale: float, num_queries: int,
            num_heads: int, block_s: int, chunk: int, paged: bool):
  """One (sequence, row block, chunk): q [rows, C], qr [rows, R] over the chunk's slots, from
  c [chunk, C], kr [chunk, R], or, paged, from the pools [pages, page, C], [pages, page, R]
  through the chunk's block-table entries table [chunk / page]."""
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
  """Chunks' normalised outputs o [B, W, Z, C] and log-sum-exps lse [B, W, Z] -> the whole
  cache's (o [B, Z, C], lse [B, Z]): each chunk weighted by exp(lse_w - lse). Rows no chunk saw
  stay o = 0, lse = -inf."""
  top = jnp.max(lse, axis=1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weight = jnp.exp(lse - top)  # 0 for empty chunks
  total = jnp.sum(weight, axis=1)  # [B, Z]
  seen = total > 0
  o = jnp.einsum('BWZ,BWZC->BZC', weight, o) / jnp.where(seen, total, 1.0)[..., None]
  return o, jnp.where(seen, top[:, 0] + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)

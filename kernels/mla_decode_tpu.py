"""Latent-attention decode in Mosaic's layout (Pallas TPU): `partials`, behind
`kernels.mla_decode.mla_decode(..., backend='mosaic_tpu')`.

Semantics are `kernels.reference.mla_decode`'s (FlashMLA's length convention); the layout is
the one TPU kernels use (vLLM tpu-inference's ragged paged attention, JAX's paged_attention):
Pallas' pipeline streams one cache block per grid step from HBM into VMEM, so the cache loop is
the grid's last, 'arbitrary' axis and the online-softmax state lives in VMEM scratch across it.

  grid (B, Z / block_rows, num_splits, steps): a program is one sequence's block of rows
  (Z = Tq x N query heads, row z = t N + n) over one chunk of the cache (flash-decoding's
  split), step i reading cache block j * steps + i of `block_s` slots.

`lengths` (and, paged, the block table) are scalar-prefetch operands (`PrefetchScalarGridSpec`):
they sit in SMEM before the grid starts, so the BlockSpecs' index maps read them to pick each
step's block. A step past the sequence's length maps to the last block the sequence has, which
the pipeline does not fetch again (the block index did not change), and `pl.when` skips its
arithmetic: nothing beyond `lengths[b]` is read or computed. Paged, the block index goes through
the table (flattened to 1-D, as SMEM pads a 2-D array's minor dimension).

Tiles meet Mosaic's (8, 128) rule: the cache blocks are [block_s, C] and [block_s, R] with C and
R whole (so any C and R), block_s and block_rows multiples of 16 (BF16 packs 16 rows per
tile); the row-wise softmax state is kept [rows, 1] (2-D, as Mosaic's vectors are) and the
log-sum-exp is written [rows, 1]. Scores and the running max, sum and output accumulate in FP32.
Which query t a row holds is counted with Tq - 1 comparisons (no integer division in the kernel).

What ran: Pallas' TPU interpret mode on CPU (tests/test_kernels_tpu.py) and ahead-of-time
compilation through libtpu for v5e, v5p, v6e and tpu7x (tests/test_kernels_lowering.py). Not run
on a TPU: its speed is unknown.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import tiles

SUBLANES = 16  # rows per tile for 16-bit types (8 for 32-bit); used for both
MAX_BLOCK_ROWS = 256
BLOCK_S_CHOICES = (512, 256, 128, 64)  # cache slots per grid step: the largest that divides S


def block_sizes(num_rows: int, num_slots: int, block_rows: int | None = None,
                block_s: int | None = None) -> tuple[int, int, int, int]:
  """-> (block_rows, padded rows, block_s, padded slots) for a contiguous cache of num_slots."""
  if block_rows is None:
    block_rows = min(MAX_BLOCK_ROWS, tiles.round_up(num_rows, SUBLANES))
  if block_s is None:
    block_s = next((b for b in BLOCK_S_CHOICES if num_slots % b == 0),
                   min(BLOCK_S_CHOICES[0], tiles.round_up(num_slots, SUBLANES)))
  for name, size in (('block_rows', block_rows), ('block_s', block_s)):
    if size < SUBLANES or size % SUBLANES:
      raise ValueError(f'mla_decode (mosaic_tpu): {name}={size} must be a multiple of '
                       f'{SUBLANES} (TPU tiles)')
  return (block_rows, tiles.round_up(num_rows, block_rows), block_s,
          tiles.round_up(num_slots, block_s))


def partials(q: jax.Array, qr: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
             lengths: jax.Array, scale: float, *, num_queries: int, num_heads: int,
             block_table: jax.Array | None, block_rows: int, block_s: int,
             num_splits: int | None, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """Rows q [B, Zp, C], qr [B, Zp, R] (Zp a multiple of block_rows) over c_kv [B, Sp, C],
  k_rope [B, Sp, R] (Sp a multiple of block_s) or, paged, pools [pages, page, C],
  [pages, page, R] with block_table [B, pages] -> per-chunk (o [B, W, Zp, C] normalised,
  lse [B, W, Zp]) float32."""
  B, Zp, C = q.shape
  R = qr.shape[-1]
  paged = block_table is not None
  if paged:
    P, block_s = c_kv.shape[:2]
    pages = block_table.shape[1]
    s_blocks = pages
  else:
    s_blocks = c_kv.shape[1] // block_s
  row_blocks = Zp // block_rows
  if num_splits is None:  # TPUs run the grid in order on one or two cores: split only to use both
    num_splits = 1 if B * row_blocks >= 2 else min(2, s_blocks)
  num_splits = max(1, min(num_splits, s_blocks))
  steps = pl.cdiv(s_blocks, num_splits)

  def cache_block(b, j, i, lengths_ref):
    """The cache block of step i of chunk j, clamped to the last block sequence b has."""
    last = jnp.clip(pl.cdiv(lengths_ref[b], block_s) - 1, 0, s_blocks - 1)
    return jnp.minimum(j * steps + i, last)

  if paged:
    table = block_table.astype(jnp.int32).reshape(-1)  # 1-D in SMEM

    def pool_index(b, r, j, i, lengths_ref, table_ref):
      page = table_ref[b * pages + cache_block(b, j, i, lengths_ref)]
      return (jnp.clip(page, 0, P - 1), 0, 0)

    cache_specs = [pl.BlockSpec((None, block_s, C), pool_index),
                   pl.BlockSpec((None, block_s, R), pool_index)]
    prefetch = (lengths.astype(jnp.int32), table)
  else:
    def cache_index(b, r, j, i, lengths_ref):
      return (b, cache_block(b, j, i, lengths_ref), 0)

    cache_specs = [pl.BlockSpec((None, block_s, C), cache_index),
                   pl.BlockSpec((None, block_s, R), cache_index)]
    prefetch = (lengths.astype(jnp.int32),)

  def rows_index(b, r, j, i, *_):
    return (b, r, 0)

  def out_index(b, r, j, i, *_):
    return (b, j, r, 0)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch),
      grid=(B, row_blocks, num_splits, steps),
      in_specs=[pl.BlockSpec((None, block_rows, C), rows_index),   # q_latent rows
                pl.BlockSpec((None, block_rows, R), rows_index)]   # q_rope rows
      + cache_specs,
      out_specs=[pl.BlockSpec((None, None, block_rows, C), out_index),
                 pl.BlockSpec((None, None, block_rows, 1), out_index)],
      scratch_shapes=[pltpu.VMEM((block_rows, C), jnp.float32),  # output accumulator
                      pltpu.VMEM((block_rows, 1), jnp.float32),  # running max
                      pltpu.VMEM((block_rows, 1), jnp.float32)])  # running sum
  kernel = functools.partial(_kernel, num_prefetch=len(prefetch), scale=scale,
                             num_queries=num_queries, num_heads=num_heads, block_s=block_s,
                             steps=steps)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[tiles.out_struct((B, num_splits, Zp, C), jnp.float32, q, c_kv),
                 tiles.out_struct((B, num_splits, Zp, 1), jnp.float32, q, c_kv)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=_interpret_mode(interpret),
      name='mla_decode_tpu',
  )(*prefetch, q, qr, c_kv, k_rope)
  return o, lse[..., 0]


def _interpret_mode(interpret):
  """True: Pallas' TPU interpret mode; 'generic': its generic interpreter; False: compiled."""
  return pltpu.InterpretParams() if interpret is True else interpret == 'generic'


def vmem_bytes(block_rows: int, block_s: int, C: int, R: int, itemsize: int) -> int:
  """VMEM one program holds, from its block shapes: inputs and outputs double-buffered by the
  pipeline (lanes padded to 128), plus the scratch, plus the [rows, block_s] FP32 scores and
  probabilities."""
  lanes = lambda n: tiles.round_up(n, 128)
  inputs = (block_rows + block_s) * (lanes(C) + lanes(R)) * itemsize
  outputs = block_rows * (lanes(C) + 128) * 4
  scratch = block_rows * (lanes(C) + 2 * 128) * 4
  temporaries = 2 * block_rows * lanes(block_s) * 4
  return 2 * (inputs + outputs) + scratch + temporaries


def _kernel(*refs, num_prefetch: int, scale: float, num_queries: int, num_heads: int,
            block_s: int, steps: int):
  """One (sequence b, row block r, chunk j, step i): q [rows, C], qr [rows, R] against the cache
  block c [block_s, C], kr [block_s, R]; o, lse written at the chunk's last step."""
  lengths_ref = refs[0]
  q_ref, qr_ref, c_ref, kr_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs[num_prefetch:]
  b, r, j, i = (pl.program_id(axis) for axis in range(4))
  rows = q_ref.shape[0]
  length = lengths_ref[b]
  start = (j * steps + i) * block_s  # the first slot of this step's block

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)

  @pl.when(start < length)
  def _step():
    q, qr, c, kr = q_ref[...], qr_ref[...], c_ref[...], kr_ref[...]
    precision = (jax.lax.Precision.HIGHEST if q.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)
    nt = (((1,), (1,)), ((), ()))  # contract the last dims: q . c^T without a transpose
    s = (jax.lax.dot_general(q, c, nt, precision=precision, preferred_element_type=jnp.float32)
         + jax.lax.dot_general(qr, kr, nt, precision=precision,
                               preferred_element_type=jnp.float32)) * scale  # [rows, block_s]
    row = r * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, block_s), 0)
    slot = start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_s), 1)
    t = sum((row >= k * num_heads).astype(jnp.int32) for k in range(1, num_queries))
    sees = length - (num_queries - 1 - t)  # slots row's query may read (FlashMLA convention)
    s = jnp.where(slot < sees, s, -jnp.inf)
    m_prev = m_ref[...]  # [rows, 1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row with nothing seen yet
    correction = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe)
    l_ref[...] = correction * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = correction * acc_ref[...] + jnp.dot(
        p.astype(c.dtype), c, precision=precision, preferred_element_type=jnp.float32)
    m_ref[...] = m_next

  @pl.when(i == steps - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0
    o_ref[...] = acc_ref[...] / jnp.where(seen, l, 1.0)
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)

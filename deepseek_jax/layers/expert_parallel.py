"""Expert-parallel MoE: hierarchical, plane-aware dispatch and combine (deepseek_jax/DESIGN.md,
"Sharding and the multi-plane mesh"; letters as its table: X nodes, Y planes, Z rows).

Tokens are split over ('data', 'expert', 'plane'); routed experts over ('expert', 'plane'), so
device (x, y) holds experts [(x Y + y) E_loc, (x Y + y + 1) E_loc) with E_loc = E/(X Y).
Groups map onto nodes (G % X == 0), so group-limited routing sends a token to at most
min(topk_group, X) nodes. Inside `jax.shard_map`, per device with Z local tokens:

  hop 1  over 'expert' (inter-node, inside one plane): each token goes ONCE to each distinct node
         among its experts' nodes, with its routing restricted to that node.   buffer [X, Z, ...]
  hop 2  over 'plane' (intra-node, NVLink): each received row goes once to each plane holding one
         of its experts, with its routing restricted to that device.           buffer [Y, X Z, ...]
  compute  the E_loc local experts on every (row, chosen local expert) pair: dropless grouped
         matmul (`grouped_matmul.expert_swiglu`), times the gates, summed per row.
  combine  hop 2 reversed (sum over planes), then hop 1 reversed (sum over nodes).

Buffers are the proven worst case (a token reaches a node at most once, a device at most once per
node), so nothing is dropped and no capacity factor exists. Collectives are `all_to_all`, which
every backend has (XLA:CPU lacks `ragged_all_to_all`, which would send only the real rows; it is
not used here). Slots are compacted per hop: a row carries min(K, E/X) slots after hop 1 and
min(K, E_loc) after hop 2, which assumes a token's K experts are distinct (top-k guarantees it).

Chunks. The worst case grows as X Y Z per device, so the Z local tokens are dispatched in chunks
of at most `chunk_tokens` (`DEFAULT_CHUNK_TOKENS`): hop 1 -> hop 2 -> compute -> combine runs
per chunk, one chunk after another (`lax.map`), and every buffer above has the chunk's Z_c tokens
in place of Z (the bound per chunk is proven as above; padding rows route nowhere). Each chunk is
rematerialized (`jax.checkpoint`), so under autodiff only a chunk's inputs are kept for the
backward pass, not its [Y X Z_c ..., D] buffers: the backward pass runs the dispatch and the
expert forward once more. At DeepSeek-V3 training scale (X = Y = 8, E_loc = 4, D = 7168,
Z = 4096, bf16) the (row, expert) pair buffer is Y X Z min(K, E_loc) = 1,048,576 rows = 15.0 GB;
held as pairs, sorted pairs and expert output, plus the hop buffers, about 49 GB per MoE layer.
With Z_c = 1024: 262,144 pair rows = 3.8 GB, about 12.3 GB in all (`buffer_rows`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import grouped_matmul
from deepseek_jax.sharding import BATCH, EXPERTS

# Tokens per device per dispatch chunk. At V3 scale it cuts the transient buffers Z / Z_c = 4x (Z =
# 4096) while hop-1 messages stay ~15 MB per peer (bandwidth-bound, not latency-bound), a local
# expert still gets ~2 Z_c = 2048 real rows per chunk on average (full matmul tiles), and 4
# sequential chunks add few collective latencies. Decoding (Z <= 1024) runs as one chunk.
# Memory-tight runs pass a smaller `chunk_tokens` (buffers scale linearly with it).
DEFAULT_CHUNK_TOKENS = 1024


def axis_size(mesh, name: str) -> int:
  """Size of mesh axis `name`, 1 when the mesh has no such axis."""
  return dict(mesh.shape).get(name, 1)


def ambient_mesh():
  """The mesh set by `jax.set_mesh` when it has more than one device, else None. Works inside
  `jax.jit` (an AbstractMesh) and outside it.

  Data parallelism alone (expert x plane = 1) takes this path too: outside `shard_map`, XLA does
  not partition the dispatch's argsort and gathers over a batch split on 'data', and every device
  worked on the whole batch's (token, expert) pairs. The tiny model's train step on 4 devices
  (v5e:2x2, data 4, batch 256 x 128) peaked at 801 MB per device that way, 293 MB in
  `shard_map`; DeepSeek-V2-Lite on 256 devices needed 1.38 TB of temporaries per device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'expert' not in mesh.axis_names:
    return None
  if axis_size(mesh, 'data') * axis_size(mesh, 'expert') * axis_size(mesh, 'plane') == 1:
    return None
  return mesh


def check_sizes(mesh, cfg: ModelConfig, batch: int) -> None:
  """ValueErrors naming the sizes when experts, groups or the batch cannot be split."""
  X, Y = axis_size(mesh, 'expert'), axis_size(mesh, 'plane')
  shards = axis_size(mesh, 'data') * X * Y
  E, G = cfg.n_routed_experts, cfg.n_group
  if E % (X * Y):
    raise ValueError(f'expert parallelism: n_routed_experts={E} is not divisible by expert x '
                     f'plane = {X} x {Y} = {X * Y} devices')
  if G % X:
    raise ValueError(f'expert parallelism: n_group={G} is not divisible by the expert axis '
                     f'({X} nodes): groups cannot map onto nodes')
  if batch % shards:
    raise ValueError(f'expert parallelism: batch B={batch} is not divisible by data x expert x '
                     f'plane = {axis_size(mesh, "data")} x {X} x {Y} = {shards}')


def chunk_layout(local_tokens: int, chunk_tokens: int | None = None) -> tuple[int, int]:
  """(chunks, tokens per chunk) for `local_tokens` tokens in chunks of at most `chunk_tokens`
  (None: `DEFAULT_CHUNK_TOKENS`). Chunks are equal, so padding is under one token per chunk."""
  limit = DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
  if limit < 1:
    raise ValueError(f'expert parallelism: chunk_tokens={chunk_tokens} must be at least 1')
  chunks = -(-local_tokens // limit)
  return chunks, -(-local_tokens // chunks)


def moe_ep(x: jax.Array, experts: jax.Array, gates: jax.Array, w_gate: jax.Array,
           w_up: jax.Array, w_down: jax.Array, mesh, cfg: ModelConfig, *,
           chunk_tokens: int | None = None) -> jax.Array:
  """x [B, T, D], experts [B*T, K] int32, gates [B*T, K], w_gate/w_up [E, D, F], w_down [E, F, D]
  -> sum_k gates[t, k] * SwiGLU_{experts[t, k]}(x[t]) as [B, T, D], experts parallel over `mesh`.

  The same value as `moe.dispatch_combine` on the unsharded inputs, up to float summation order.
  Per device the Z = B T / (data X Y) tokens go in chunks of Z_c <= `chunk_tokens` tokens
  (`chunk_layout`; None: `DEFAULT_CHUNK_TOKENS`, or Z when smaller), one after another, each
  rematerialized under autodiff (even a single chunk: its backward pass keeps only the inputs and
  runs the dispatch and the expert forward again). The buffers are the worst case per chunk:
  hop 1 [X, Z_c, D], hop 2 [Y, X Z_c, D], and Y X Z_c min(K, E_loc) (row, expert) pairs for the
  grouped matmul (`buffer_rows`).
  """
  B, T, D = x.shape
  K = experts.shape[-1]
  check_sizes(mesh, cfg, B)
  chunk_layout(1, chunk_tokens)  # a bad chunk_tokens fails here, outside shard_map
  batch_axes = tuple(a for a in BATCH if a in mesh.axis_names)
  expert_axes = tuple(a for a in EXPERTS if a in mesh.axis_names)
  token_spec, weight_spec = PartitionSpec(batch_axes), PartitionSpec(expert_axes)
  local = functools.partial(
      _local_moe, X=axis_size(mesh, 'expert'), Y=axis_size(mesh, 'plane'),
      E=cfg.n_routed_experts, chunk_tokens=chunk_tokens,
      replicas=tuple(a for a in batch_axes if a not in expert_axes),
      impl=cfg.moe_matmul, precision=cfg.precision, fp8_kernel=cfg.fp8_matmul_kernel)
  return jax.shard_map(local, mesh=mesh, in_specs=(token_spec,) * 3 + (weight_spec,) * 3,
                       out_specs=token_spec)(x, experts.reshape(B, T, K), gates.reshape(B, T, K),
                                         w_gate, w_up, w_down)


def _local_moe(x, experts, gates, w_gate, w_up, w_down, *, X, Y, E, chunk_tokens, replicas, impl,
               precision, fp8_kernel):
  """One device: x [b, T, D], experts/gates [b, T, K], its experts' weights [E_loc, ...]."""
  b, T, D = x.shape
  K = experts.shape[-1]
  Z = b * T
  if replicas:  # weights are copies over 'data': their gradient sums over it, outside custom_vjps
    w_gate, w_up, w_down = jax.lax.pcast((w_gate, w_up, w_down), replicas, to='varying')
  tokens = x.reshape(Z, D)
  experts = experts.reshape(Z, K)
  gates = gates.reshape(Z, K).astype(x.dtype)
  chunks, Z_c = chunk_layout(Z, chunk_tokens)

  def one_chunk(chunk):
    return _dispatch_combine(*chunk, w_gate, w_up, w_down, X=X, Y=Y, E=E, impl=impl,
                             precision=precision, fp8_kernel=fp8_kernel)

  # Remat: the backward pass keeps a chunk's inputs only, not its [Y X Z_c ..., D] buffers.
  one_chunk = jax.checkpoint(one_chunk, prevent_cse=chunks == 1)
  if chunks == 1:
    return one_chunk((tokens, experts, gates)).reshape(b, T, D)
  pad = chunks * Z_c - Z  # padding rows: expert id E is on no node, gate 0, so they go nowhere
  padded = [jnp.pad(a, ((0, pad), (0, 0)), constant_values=fill).reshape(chunks, Z_c, -1)
            for a, fill in ((tokens, 0), (experts, E), (gates, 0))]                # [n, Z_c, ...]
  out = jax.lax.map(one_chunk, tuple(padded))                                     # [n, Z_c, D]
  return out.reshape(chunks * Z_c, D)[:Z].reshape(b, T, D)


def _dispatch_combine(tokens, experts, gates, w_gate, w_up, w_down, *, X, Y, E, impl, precision,
                      fp8_kernel):
  """One chunk on one device: tokens [Z, D], experts/gates [Z, K] (id E: no expert) -> [Z, D]."""
  Z, D = tokens.shape
  K = experts.shape[-1]
  E_node, E_loc = E // X, E // (X * Y)

  # Hop 1: one row per (token, destination node), expert ids local to that node.
  to_node = (experts // E_node)[None] == jnp.arange(X)[:, None, None]           # [X, Z, K]
  ids1, gates1 = _restrict(experts % E_node, gates, to_node, min(K, E_node), E_node)
  rows1 = jnp.where(jnp.any(to_node, -1)[..., None], tokens[None], 0)           # [X, Z, D]
  rows1, ids1, gates1 = (_all_to_all(a, 'expert', X) for a in (rows1, ids1, gates1))
  Z1 = X * Z
  rows1, ids1, gates1 = rows1.reshape(Z1, D), ids1.reshape(Z1, -1), gates1.reshape(Z1, -1)

  # Hop 2: one row per (hop-1 row, destination plane), expert ids local to that device.
  to_plane = (ids1 // E_loc)[None] == jnp.arange(Y)[:, None, None]              # [Y, Z1, K1]
  ids2, gates2 = _restrict(ids1 % E_loc, gates1, to_plane, min(K, E_loc), E_loc)
  rows2 = jnp.where(jnp.any(to_plane, -1)[..., None], rows1[None], 0)           # [Y, Z1, D]
  rows2, ids2, gates2 = (_all_to_all(a, 'plane', Y) for a in (rows2, ids2, gates2))
  Z2 = Y * Z1

  out = _local_experts(rows2.reshape(Z2, D), ids2.reshape(Z2, -1), gates2.reshape(Z2, -1),
                       w_gate, w_up, w_down, impl, precision, fp8_kernel)       # [Z2, D]

  # Combine: back over 'plane', sum per hop-1 row; back over 'expert', sum per token.
  out = jnp.sum(_all_to_all(out.reshape(Y, Z1, D), 'plane', Y), axis=0)         # [Z1, D]
  return jnp.sum(_all_to_all(out.reshape(X, Z, D), 'expert', X), axis=0)        # [Z, D]


def _restrict(ids, gates, to_dest, slots: int, invalid: int):
  """Routing restricted to each destination: ids/gates [Z, K], to_dest [n, Z, K] (to_dest[i, z, k]:
  slot k of row z goes to destination i) -> ids, gates [n, Z, slots], the destination's slots
  first; unused slots get id `invalid` and gate 0. `slots` bounds the slots one destination
  can get (a row's experts are distinct)."""
  ids = jnp.broadcast_to(ids, to_dest.shape)
  gates = jnp.broadcast_to(gates, to_dest.shape)
  if slots < to_dest.shape[-1]:
    first = jnp.argsort(~to_dest, axis=-1, stable=True)[..., :slots]  # this destination's slots
    ids, gates, to_dest = (jnp.take_along_axis(a, first, axis=-1) for a in (ids, gates, to_dest))
  return jnp.where(to_dest, ids, invalid), jnp.where(to_dest, gates, 0)


def _all_to_all(a: jax.Array, axis: str, size: int) -> jax.Array:
  """a [size, ...], block i for device i of `axis` -> [size, ...], block j from device j."""
  if size == 1:
    return a
  return jax.lax.all_to_all(a, axis, split_axis=0, concat_axis=0)


def _local_experts(rows, ids, gates, w_gate, w_up, w_down, impl, precision, fp8_kernel):
  """rows [Z, D], ids/gates [Z, K] (id E_loc: no pair), local weights [E_loc, ...] ->
  sum_k gates[z, k] * SwiGLU_{ids[z, k]}(rows[z]), [Z, D].

  Invalid pairs are zero rows sorted after every valid one and counted into the last expert's
  group: a zero row's SwiGLU is exactly zero in value and contributes exactly zero to every
  weight gradient, and its gate is zero, so no padding expert or weight copy is needed.
  """
  Z, K = ids.shape
  E_loc, D = w_gate.shape[0], rows.shape[-1]
  key = ids.reshape(Z * K)
  order = jnp.argsort(key, stable=True)  # pairs sorted by local expert, invalid ones last
  inverse = jnp.argsort(order)
  counts = jnp.sum(key[:, None] == jnp.arange(E_loc + 1)[None], axis=0, dtype=jnp.int32)
  group_sizes = counts[:E_loc].at[E_loc - 1].add(counts[E_loc])
  pairs = jnp.broadcast_to(rows[:, None, :], (Z, K, D)).reshape(Z * K, D)
  pairs = jnp.where((key < E_loc)[:, None], pairs, 0)
  out = grouped_matmul.expert_swiglu(grouped_matmul.take_rows(pairs, order, inverse),
                                     group_sizes, w_gate, w_up, w_down, impl, precision,
                                     fp8_kernel)
  per_slot = grouped_matmul.take_rows(out, inverse, order).reshape(Z, K, D)
  return jnp.einsum('ZKD,ZK->ZD', per_slot, gates)


def buffer_rows(cfg: ModelConfig, X: int, Y: int, local_tokens: int,
                chunk_tokens: int | None = None) -> dict[str, int]:
  """Static worst-case sizes per device for `local_tokens` tokens dispatched in chunks of at most
  `chunk_tokens` (as `moe_ep`): the chunks and their tokens, and per chunk the rows sent over each
  hop and the (row, expert) pairs run by the grouped matmul."""
  K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
  chunks, Z_c = chunk_layout(local_tokens, chunk_tokens)
  return dict(chunks=chunks, chunk_tokens=Z_c, hop1_rows=X * Z_c, hop2_rows=Y * X * Z_c,
              expert_pairs=Y * X * Z_c * min(K, E // (X * Y)))

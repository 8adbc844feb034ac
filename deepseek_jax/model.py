"""The DeepSeek-V3 language model: embedding, L decoder blocks, final norm, head, P MTP modules.

One forward pass for every use. `DeepSeekV3(cfg, rngs)(tokens)` trains: it returns a
`ModelOutput` with the main logits, the MTP logits per depth, and per MoE layer (main layers
first, then MTP blocks) the expert load, the sequence-wise balance loss and each token's routed
experts. `model(tokens, cache=cache)` is the same pass for T new tokens per sequence at positions
cache.lengths[b] + t: every block's attention reads and writes its layer of the cache (absorbed on
a `LatentCache`, naive on a `NaiveCache`), and `output.cache` is the updated cache (moving
`lengths` is the caller's). With a cache the MTP modules do not run: drafting feeds them tokens
the main pass has not seen yet, through `mtp_forward`, which the training pass also uses. At a
jit boundary use `nnx.split` and `apply(graphdef, state, tokens)`, a pure function of arrays.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import linear, param
from deepseek_jax.layers.block import Block
from deepseek_jax.layers.kv_cache import Cache, slot_positions
from deepseek_jax.layers.moe import MoEStats
from deepseek_jax.layers.mtp import MTPModule
from deepseek_jax.layers.norm import RMSNorm


@struct.dataclass
class ModelOutput:
  logits: jax.Array            # [B, T, V] float32, predicts token t+1
  mtp_logits: jax.Array        # [P, B, T, V] float32, depth k (1-based) predicts token t+k+1
  hidden: jax.Array            # [B, T, D] last block's output, before the final norm (h^0)
  expert_load: jax.Array       # [L_moe, E] int32, one row per MoE layer (main, then MTP blocks)
  seq_balance_loss: jax.Array  # [L_moe] float32, eqs. 17-20 per MoE layer, without alpha
  expert_ids: jax.Array | None = None  # [L_moe, B, T, K] int32, each token's routed experts
  cache: Any = None            # the updated cache when one was given
  # With head=False (logits and mtp_logits None): the output head's inputs [1 + P, B, T, D],
  # the final-normed hidden states of the main model, then of each MTP depth.
  head_inputs: jax.Array | None = None


class MTPOutput(NamedTuple):
  logits: jax.Array            # [B, T, V] float32, depth k predicts token t+k+1
  hidden: jax.Array            # [B, T, D] h^k, the next depth's input
  stats: MoEStats | None
  cache: Cache | None          # the module's one-layer cache, updated, when one was given
  normed: jax.Array | None = None  # [B, T, D] the head's input; logits are None with head=False


class DeepSeekV3(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, V = cfg.hidden_size, cfg.vocab_size
    self.cfg = cfg
    self.embed = param.normal(rngs, (V, D), ('vocab', 'embed'), cfg.init_std)
    if cfg.scan_layers:  # two stacks, each of its layers' parameters along a leading axis
      (dense_first, dense), (moe_first, moe) = layer_groups(cfg)
      self.dense_layers = _stacked_blocks(cfg, dense_first, dense, rngs) if dense else None
      self.moe_layers = _stacked_blocks(cfg, moe_first, moe, rngs) if moe else None
    else:
      self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(D, cfg.rms_norm_eps)
    self.head = param.normal(rngs, (D, V), ('embed', 'vocab'), cfg.init_std)  # untied
    self.mtp = nnx.List([MTPModule(cfg, k + 1, rngs) for k in range(cfg.mtp_depth)])

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))

  def logits(self, normed_hidden: jax.Array) -> jax.Array:
    """The shared output head, accumulated in float32."""
    return linear.linear(normed_hidden, self.head[...], out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: Cache | None = None,
               head: bool = True) -> ModelOutput:
    """tokens [B, T] int -> ModelOutput. positions default to 0..T-1, or with a cache to
    cache.lengths[b] + t. head=False stops before the output head: `head_inputs` instead of
    logits, for a loss that applies the head in chunks (train/loss.py)."""
    B, T = tokens.shape
    if positions is None:
      positions = _default_positions(B, T, cache)
    x = self.embed_tokens(tokens)
    stats, layers = [], []  # stats: MoEStats with a leading axis of layers, one per MoE run
    if self.cfg.scan_layers and cache is None:
      for stack in (self.dense_layers, self.moe_layers):
        if stack is not None:
          x, stack_stats = _scan_blocks(stack, x, positions, segment_ids)
          stats.append(stack_stats)
    else:  # one layer at a time: decoding updates each layer's cache in place (see _scan_blocks)
      for i in range(self.cfg.num_layers):
        x, layer_stats, layer = self.block(i)(x, positions, segment_ids,
                                              None if cache is None else cache.layer(i))
        stats.append(None if layer_stats is None else _one_layer(layer_stats))
        layers.append(layer)
    hidden = x
    normed = [self.norm(x)]
    logits = self.logits(normed[0]) if head else None
    mtp_logits = []
    h = hidden
    depths = range(1, len(self.mtp) + 1) if cache is None else ()  # drafting: `mtp_forward`
    for k in depths:
      # Token t_{i+k} for position i; the last k positions have no such token and see padding
      # (their MTP targets do not exist either, so the loss masks them).
      next_tokens = jnp.concatenate([tokens[:, k:], jnp.zeros((B, k), tokens.dtype)], axis=1)
      mtp = self.mtp_forward(k, h, next_tokens, positions, segment_ids, head=head)
      h = mtp.hidden
      mtp_logits.append(mtp.logits)
      normed.append(mtp.normed)
      stats.append(None if mtp.stats is None else _one_layer(mtp.stats))
    moe_stats = [s for s in stats if s is not None]
    E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
    V = self.cfg.vocab_size
    return ModelOutput(
        logits=logits,
        mtp_logits=(None if not head else jnp.stack(mtp_logits) if mtp_logits
                    else jnp.zeros((0, B, T, V), jnp.float32)),
        hidden=hidden,
        expert_load=(jnp.concatenate([s.expert_load for s in moe_stats]) if moe_stats
                     else jnp.zeros((0, E), jnp.int32)),
        seq_balance_loss=(jnp.concatenate([s.seq_balance_loss for s in moe_stats]) if moe_stats
                          else jnp.zeros((0,), jnp.float32)),
        expert_ids=(jnp.concatenate([s.experts for s in moe_stats]) if moe_stats
                    else jnp.zeros((0, B, T, K), jnp.int32)),
        cache=None if cache is None else cache.with_layers(layers),
        head_inputs=None if head else jnp.stack(normed),
    )

  def block(self, i: int) -> Block:
    """Decoder layer i (0-based, main model) as a `Block`. Under `scan_layers` it is a view made
    from slice i of its stack: reading works (also under jit); assigning to it does not reach the
    stack (`stack_layers` / `unstack_layers` convert whole models)."""
    if not 0 <= i < self.cfg.num_layers:
      raise IndexError(f'layer {i}: the model has {self.cfg.num_layers} decoder layers')
    if not self.cfg.scan_layers:
      return self.layers[i]
    (name,), index = layer_location(self.cfg, i)
    graphdef, state = nnx.split(getattr(self, name))
    return nnx.merge(graphdef, jax.tree.map(lambda v: _layer_of(v, index), state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable)))

  def mtp_forward(self, depth: int, h_prev: jax.Array, next_tokens: jax.Array,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  cache: Cache | None = None, head: bool = True) -> MTPOutput:
    """MTP module `depth` (1-based, V3 §2.2): h_prev [B, T, D] is h^{depth-1}_i, next_tokens [B, T]
    is t_{i+depth}. Positions default as in `__call__`; `cache` is the module's own one-layer
    cache when drafting; head=False leaves the logits None (`normed` is the head's input)."""
    module = self.mtp[depth - 1]
    if positions is None:
      positions = _default_positions(*h_prev.shape[:2], cache)
    h, normed, stats, layer = module(h_prev, self.embed_tokens(next_tokens), positions,
                                     segment_ids, None if cache is None else cache.layer(0))
    return MTPOutput(self.logits(normed) if head else None, h, stats,
                     None if cache is None else cache.with_layers([layer]), normed)


def layer_groups(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
  """(first layer, count) of the dense prefix and of the MoE layers."""
  dense = min(cfg.first_k_dense, cfg.num_layers)
  return (0, dense), (dense, cfg.num_layers - dense)


def _stacked_blocks(cfg: ModelConfig, first: int, count: int, rngs: nnx.Rngs) -> Block:
  """`count` blocks of layer `first`'s kind as one Block whose variables have a leading axis of
  size `count` (logical name `layers`).

  Each layer draws the keys it would draw unrolled: block j starts where the unrolled model's
  sequential draws would be (the stream's count + j * draws per block), so both layouts
  initialise to the same values and `stack_layers` of an unrolled model is the scanned one."""
  draws = _draws_per_block(cfg, first)
  stream = rngs.params
  key, start = stream.key[...], stream.count[...]

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(layer_count):
    layer_rngs = nnx.Rngs(params=key)
    layer_rngs.params.count[...] = layer_count
    return Block(cfg, first, layer_rngs)

  stack = make(start + jnp.uint32(draws) * jnp.arange(count, dtype=jnp.uint32))
  stream.count[...] = start + jnp.uint32(draws * count)
  return stack


class _CountingRngs:
  """Stands in for `nnx.Rngs` to count the keys a module draws (`param.normal` is the one
  caller of `rngs.params()` in the layers)."""

  def __init__(self):
    self.draws = 0

  def params(self) -> jax.Array:
    self.draws += 1
    return jax.random.key(0)


@functools.lru_cache(maxsize=16)  # every create / abstract would trace a block again
def _draws_per_block(cfg: ModelConfig, layer: int) -> int:
  counter = _CountingRngs()
  with nnx.use_eager_sharding(False):
    jax.eval_shape(lambda: nnx.state(Block(cfg, layer, counter)))
  return counter.draws


def _scan_blocks(stack: Block, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None) -> tuple[jax.Array, MoEStats | None]:
  """x through every layer of a stacked Block by `jax.lax.scan`: one traced and compiled body
  (rematerialized inside by the block's own policy), the MoE statistics stacked per layer.

  Training and cacheless prefill only. With a cache the model walks the layers one by one: in a
  scan, each step's layer of the cache would be sliced out of the stack and written back whole."""
  graphdef, state = nnx.split(stack)

  def body(x, layer_state):
    # Positions and segments tied to the carry: XLA would otherwise hoist what depends on them
    # alone (rope tables, masks) out of the layer loop and keep it for the whole step (one
    # layer's grad at T = 8,192 for a v5e chip: 29.5 MB of temporaries without the tie, 21.7
    # with it; attention.py ties each block's mask to its own loop for the same reason).
    x, layer_positions, layer_segments = jax.lax.optimization_barrier(
        (x, positions, segment_ids))
    x, stats, _ = nnx.merge(graphdef, layer_state)(x, layer_positions, layer_segments)
    return x, stats

  return jax.lax.scan(body, x, state)


def _layer_of(variable: nnx.Variable, index: int) -> nnx.Variable:
  """Slice `index` of a stacked variable, its logical axes without the leading `layers`."""
  value = variable.get_value()
  value = (jax.ShapeDtypeStruct(value.shape[1:], value.dtype)  # of `abstract(cfg)`
           if isinstance(value, jax.ShapeDtypeStruct) else value[index])
  axes = variable.get_metadata().get('out_sharding')
  if axes:
    return variable.replace(value, out_sharding=tuple(axes[1:]))
  return variable.replace(value)


def _one_layer(stats: MoEStats) -> MoEStats:
  """One layer's statistics with the leading layers axis the stacks give theirs."""
  return jax.tree.map(lambda a: a[None], stats)


def _default_positions(B: int, T: int, cache: Cache | None) -> jax.Array:
  """[B, T]: 0..T-1 without a cache, cache.lengths[b] + t with one."""
  if cache is None:
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
  return slot_positions(cache.lengths, T)


def _creation_context(mesh: jax.sharding.Mesh | None, rules) -> contextlib.AbstractContextManager:
  """Flax shards annotated variables eagerly; without a mesh that must be switched off."""
  if mesh is None:
    return nnx.use_eager_sharding(False)
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  if rules is not None:
    stack.enter_context(nnx.logical_axis_rules(rules))
  return stack


def create(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
           rules=None) -> DeepSeekV3:
  """A freshly initialised model (sharded by `rules` over `mesh` when given).

  Raises MemoryError at once, before allocating anything, when the parameters cannot fit. Under
  a trace (`jax.eval_shape`, or `jax.jit` with sharded outputs, as the training loop creates its
  state) nothing is allocated here, and where the result lands is the caller's to check."""
  if _eager():
    check_fits(cfg, mesh)
  with _creation_context(mesh, rules):
    return DeepSeekV3(cfg, nnx.Rngs(params=seed))


def _eager() -> bool:
  """Whether this runs eagerly rather than under a JAX trace (no public API says so)."""
  from jax._src import core  # pylint: disable=import-outside-toplevel
  return core.trace_state_clean()


def param_bytes(cfg: ModelConfig) -> int:
  """Bytes of every variable of the model (parameters, router biases), as `abstract(cfg)` has
  them, from one abstract block of each kind: tracing all 61 + 1 of V3's blocks takes minutes."""
  def nbytes(make) -> int:
    with nnx.use_eager_sharding(False):
      module = nnx.eval_shape(lambda: make(nnx.Rngs(params=0)))
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(nnx.state(module)))
  L, dense = cfg.num_layers, min(cfg.first_k_dense, cfg.num_layers)
  D, V = cfg.hidden_size, cfg.vocab_size
  total = (2 * V * D + D) * 4  # embedding, head, final norm: float32
  if dense:
    total += dense * nbytes(lambda rngs: Block(cfg, 0, rngs))
  if L > dense:
    total += (L - dense) * nbytes(lambda rngs: Block(cfg, dense, rngs))
  return total + sum(nbytes(lambda rngs, k=k: MTPModule(cfg, k, rngs))
                     for k in range(1, cfg.mtp_depth + 1))


def device_memory_bytes(device: jax.Device) -> int | None:
  """What one device can hold: its allocator's limit on a GPU or TPU, the host's available
  memory for a CPU device (None when neither is known)."""
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      fields = dict(line.split(':', 1) for line in f)
    return int(fields['MemAvailable'].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None


def check_fits(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> None:
  """MemoryError naming both sizes when even a perfect split of the parameters over the mesh's
  devices (one device without a mesh) exceeds one device's memory. A lower bound on the need:
  it passes configs that may still not fit with optimizer state and activations."""
  devices = mesh.devices.size if mesh is not None else 1
  device = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0])
  need = param_bytes(cfg) / devices
  have = device_memory_bytes(device)
  if have is not None and need > have:
    raise MemoryError(
        f'model.create: the parameters need {need / 2**30:,.1f} GiB per device '
        f'({param_bytes(cfg) / 2**30:,.1f} GiB over {devices} device(s)), but {device} '
        f'({device.platform}) has {have / 2**30:,.1f} GiB available. Use model.abstract(cfg) '
        'for shapes without memory, or a mesh with more devices (analysis.memory tabulates '
        'the train state per device).')


def abstract(cfg: ModelConfig) -> DeepSeekV3:
  """The model with `jax.ShapeDtypeStruct` leaves: shapes for free, even for 671B parameters."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(params=0)))


def apply(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
          positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> ModelOutput:
  """Pure forward pass over split state, for use inside `jax.jit` / `jax.grad`."""
  model = nnx.merge(graphdef, state)
  return model(tokens, positions, segment_ids)


# ---- the two layouts of the decoder layers ------------------------------------------------------

def layer_location(cfg: ModelConfig, i: int) -> tuple[tuple, int | None]:
  """Where decoder layer i's variables live in the state: (path prefix, index along the stack's
  leading axis), the index None when layers are not stacked."""
  if not cfg.scan_layers:
    return ('layers', i), None
  if i < cfg.first_k_dense:
    return ('dense_layers',), i
  return ('moe_layers',), i - cfg.first_k_dense


def relayout(flat: dict[tuple, Any], cfg: ModelConfig) -> dict[tuple, Any]:
  """A flat {path: array} tree of either layout (`cfg` is the model's, its `scan_layers` read
  from the paths) in the other: per-layer ('layers', i, ...) entries stacked into
  ('dense_layers' | 'moe_layers', ...), or stacks split into layers. Any tree shaped like the
  model's state works (parameters, router biases, optimizer moments)."""
  out, stacks = {}, {}
  for path, value in flat.items():
    if path[0] == 'layers':
      prefix, index = layer_location(cfg.replace(scan_layers=True), path[1])
      stacks.setdefault(prefix + path[2:], {})[index] = value
    elif path[0] in ('dense_layers', 'moe_layers'):
      first = 0 if path[0] == 'dense_layers' else cfg.first_k_dense
      for j in range(value.shape[0]):
        out[('layers', first + j) + path[1:]] = value[j]
    else:
      out[path] = value
  for path, layers in stacks.items():
    out[path] = jnp.stack([layers[j] for j in range(len(layers))])
  return out


def _with_layout(model: DeepSeekV3, scan_layers: bool) -> DeepSeekV3:
  if model.cfg.scan_layers == scan_layers:
    return model
  graphdef, target = nnx.split(abstract(model.cfg.replace(scan_layers=scan_layers)))
  values = relayout({path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model))},
                    model.cfg)
  return nnx.merge(graphdef, nnx.from_flat_state(
      {path: v.replace(values[path]) for path, v in nnx.to_flat_state(target)}))


def stack_layers(model: DeepSeekV3) -> DeepSeekV3:
  """The same model with `scan_layers=True` (its parameters stacked); the model itself if it is."""
  return _with_layout(model, True)


def unstack_layers(model: DeepSeekV3) -> DeepSeekV3:
  """The same model with `scan_layers=False` (one module per layer)."""
  return _with_layout(model, False)


# ---- the trainable tree: what the optimizer updates, split from the rest of the state -----

def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, nnx.State], nnx.State]:
  """model -> (graphdef, {'params': Param state, 'router_bias': RouterBias state}, rest)."""
  graphdef, params, router_bias, rest = nnx.split(model, nnx.Param, param.RouterBias, ...)
  return graphdef, {'params': params, 'router_bias': router_bias}, rest


def merge_trainable(graphdef: nnx.GraphDef, tree: dict[str, nnx.State],
                    rest: nnx.State) -> nnx.Module:
  """The inverse of `split_trainable`."""
  return nnx.merge(graphdef, tree['params'], tree['router_bias'], rest)

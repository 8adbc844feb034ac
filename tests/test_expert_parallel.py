"""Expert-parallel MoE on 8 virtual CPU devices: `moe_ep` against a float64 per-token loop and
against the unsharded `dispatch_combine` (values and gradients) on four (data, expert, plane)
meshes, with routing that leaves devices idle, and in several chunks that do not divide the
tokens; the buffer sizes per chunk; the MoE layer under `jax.set_mesh` against the layer without
a mesh; the size errors; and the traffic counts against direct loops."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from deepseek_jax import sharding
from deepseek_jax.analysis import traffic as traffic_lib
from deepseek_jax.layers import expert_parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import moe, router

D, F, E, K = 32, 16, 16, 4
B, T = 8, 4                                 # 32 tokens: 4 per device on 8 devices
MESHES = [(1, 1, 8), (1, 2, 4), (2, 2, 2), (1, 8, 1)]


def moe_cfg(n_group=4, **changes) -> ModelConfig:
  base = dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
              n_group=n_group, topk_group=2, n_shared_experts=1, use_router_bias=True,
              moe_matmul='blocked')
  return ModelConfig(**{**base, **changes})


def cfg_for(shape) -> ModelConfig:
  return moe_cfg(n_group=max(4, shape[1]))  # groups map onto the expert axis' nodes


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def weights(seed):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
          for shape in ((E, D, F), (E, D, F), (E, F, D))]


def routing_cases(seed, length=T):
  """Two routings for B*length tokens: group-limited (2 of 8 groups, every device busy), and one
  forced onto experts 0-3 only (one node of two, or two devices of eight: the other devices get
  no token at all)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, length, D)).astype(np.float32)
  routed = node_limited_routing(B * length, E, 8, 2, K, seed)
  forced = np.stack([rng.permutation(4) for _ in range(B * length)]).astype(np.int32)
  gates = lambda: rng.uniform(0.2, 1.0, (B * length, K)).astype(np.float32)
  return x, {'routed': (routed, gates()), 'forced': (forced, gates())}


def node_limited_routing(tokens, E, G, M, K, seed):
  """Random group-limited routing: per token M of the G groups, then K distinct experts in them."""
  rng = np.random.default_rng(seed)
  per_group = E // G
  rows = []
  for _ in range(tokens):
    groups = rng.choice(G, M, replace=False)
    allowed = (groups[:, None] * per_group + np.arange(per_group)[None]).ravel()
    rows.append(rng.choice(allowed, K, replace=False))
  return np.asarray(rows, np.int32)


def per_token_loop(x, experts, gates, w):
  """float64: out[t] = sum_k gates[t, k] SwiGLU_{experts[t, k]}(x[t])."""
  w_gate, w_up, w_down = (a.astype(np.float64) for a in w)
  tokens = x.reshape(-1, D).astype(np.float64)
  out = np.zeros_like(tokens)
  for t, row in enumerate(tokens):
    for e, g in zip(experts[t], gates[t]):
      gate, up = row @ w_gate[e], row @ w_up[e]
      out[t] += g * (gate * sigmoid(gate) * up) @ w_down[e]
  return out.reshape(x.shape)


def value_and_grads(apply, x, experts, gates, w, cot):
  """apply(x, experts, gates, *w) -> out; its value and d<out, cot>/d(x, gates, *w)."""
  def loss(x, gates, *w):
    out = apply(x, experts, gates, *w)
    return jnp.sum(out * cot), out
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, gates, *w)


@jax.jit
def unsharded(x, experts, gates, w_gate, w_up, w_down, cot):
  def apply(x, experts, gates, *w):
    routing = router.Routing(experts, gates, None)
    out = moe.dispatch_combine(x.reshape(-1, D), routing, router.expert_load(experts, E), *w,
                               'blocked')
    return out.reshape(x.shape)
  return value_and_grads(apply, x, experts, gates, (w_gate, w_up, w_down), cot)


@functools.cache
def sharded(shape, chunk_tokens=None):
  mesh, cfg = sharding.make_mesh(*shape), cfg_for(shape)
  apply = lambda x, experts, gates, *w: expert_parallel.moe_ep(x, experts, gates, *w, mesh, cfg,
                                                               chunk_tokens=chunk_tokens)
  return jax.jit(lambda x, experts, gates, w_gate, w_up, w_down, cot: value_and_grads(
      apply, x, experts, gates, (w_gate, w_up, w_down), cot))


def assert_close(got, want, what):
  got, want = np.asarray(got), np.asarray(want)
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= 1e-5, f'{what}: relative error {rel:.2e}'


@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_moe_ep_equals_unsharded_values_and_gradients(shape):
  x, cases = routing_cases(seed=1)
  w = weights(seed=2)
  cot = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
  X, P = shape[1], shape[2]
  for name, (experts, gates) in cases.items():
    loop = per_token_loop(x, experts, gates, w)
    grads_ep, out_ep = sharded(shape)(x, experts, gates, *w, cot)
    grads, out = unsharded(x, experts, gates, *w, cot)
    assert_close(out, loop, f'{name}: dispatch_combine vs float64 loop')
    assert_close(out_ep, loop, f'{name}: moe_ep vs float64 loop')
    assert_close(out_ep, out, f'{name}: moe_ep vs dispatch_combine')
    for arg, g_ep, g in zip(('x', 'gates', 'w_gate', 'w_up', 'w_down'), grads_ep, grads):
      assert_close(g_ep, g, f'{name}: d/d{arg}')
    devices_used = np.unique(experts // (E // (X * P)))
    if name == 'forced':  # devices without a single token, and experts without gradient
      assert len(devices_used) < X * P
      assert np.all(np.asarray(grads_ep[2])[4:] == 0)
    else:
      assert len(devices_used) == X * P


# ---- chunks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(2, 2, 2), (1, 8, 1)], ids=lambda s: 'x'.join(map(str, s)))
def test_moe_ep_in_chunks_equals_unsharded_values_and_gradients(shape):
  # 10 tokens per device in chunks of 4: three chunks of 4, the last with 2 padding rows.
  x, cases = routing_cases(seed=7, length=10)
  experts, gates = cases['routed']
  w = weights(seed=8)
  cot = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
  layout = expert_parallel.buffer_rows(cfg_for(shape), shape[1], shape[2], 10, chunk_tokens=4)
  assert (layout['chunks'], layout['chunk_tokens']) == (3, 4)
  grads_ep, out_ep = sharded(shape, 4)(x, experts, gates, *w, cot)
  grads, out = unsharded(x, experts, gates, *w, cot)
  assert_close(out_ep, per_token_loop(x, experts, gates, w), 'chunked moe_ep vs float64 loop')
  assert_close(out_ep, out, 'chunked moe_ep vs dispatch_combine')
  for arg, g_ep, g in zip(('x', 'gates', 'w_gate', 'w_up', 'w_down'), grads_ep, grads):
    assert_close(g_ep, g, f'chunked: d/d{arg}')


def test_backward_keeps_only_the_chunks_inputs(capsys):
  # Rematerialized chunks: the residuals are the weights and the padded chunk inputs (8 devices x
  # 3 chunks of 4 tokens), none of the hop or (row, expert) pair buffers.
  shape = (1, 2, 4)
  mesh, cfg = sharding.make_mesh(*shape), cfg_for(shape)
  x, cases = routing_cases(seed=7, length=10)
  experts, gates = cases['routed']
  loss = lambda x, gates, *w: jnp.sum(expert_parallel.moe_ep(x, experts, gates, *w, mesh, cfg,
                                                             chunk_tokens=4))
  capsys.readouterr()
  print_saved_residuals(loss, x, gates, *weights(seed=8))
  shapes = [tuple(map(int, dims.split(','))) for dims in
            re.findall(r'^[a-z0-9]+\[([0-9,]*)\]', capsys.readouterr().out, re.M) if dims]
  weight_shapes = {(E, D, F), (E, F, D)}
  assert sum(s in weight_shapes for s in shapes) == 3
  assert (8 * 3, 4, D) in shapes
  largest = max(np.prod(s) for s in shapes if s not in weight_shapes)
  assert largest == 8 * 3 * 4 * D, shapes


def test_buffer_rows_shrink_with_the_chunk():
  cfg = cfg_for((1, 8, 1))  # X = 8, P = 1, E_loc = 2: a row carries min(K, E_loc) = 2 slots
  whole = expert_parallel.buffer_rows(cfg, 8, 1, 10)     # 10 < default chunk: one chunk
  chunked = expert_parallel.buffer_rows(cfg, 8, 1, 10, chunk_tokens=4)
  assert whole == dict(chunks=1, chunk_tokens=10, hop1_rows=80, hop2_rows=80, expert_pairs=160)
  assert chunked == dict(chunks=3, chunk_tokens=4, hop1_rows=32, hop2_rows=32, expert_pairs=64)
  # Equal chunks: 1025 tokens in chunks of at most 1024 are two of 513, not 1024 + 1.
  assert expert_parallel.chunk_layout(1025, 1024) == (2, 513)
  # The module docstring's DeepSeek-V3 figures: 8 nodes x 8 planes, N = 4096 tokens per device.
  v3 = ModelConfig(hidden_size=D, moe_intermediate_size=F, n_routed_experts=256,
                   num_experts_per_tok=8, n_group=8, topk_group=4)
  before = expert_parallel.buffer_rows(v3, 8, 8, 4096, chunk_tokens=4096)
  after = expert_parallel.buffer_rows(v3, 8, 8, 4096)
  assert (before['hop1_rows'], before['hop2_rows'], before['expert_pairs']) == (
      32768, 262144, 1048576)
  assert (after['chunks'], after['hop1_rows'], after['hop2_rows'], after['expert_pairs']) == (
      4, 8192, 65536, 262144)
  with pytest.raises(ValueError, match='chunk_tokens=0 must be at least 1'):
    expert_parallel.chunk_layout(10, 0)


# ---- the MoE layer under jax.set_mesh -----------------------------------------------------------

def moe_state(cfg, seed):
  """The MoE layer split into graphdef and state, every weight drawn from numpy (shapes from
  eval_shape: no random init to compile), scaled so that routing has clear winners."""
  with nnx.use_eager_sharding(False):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: moe.MoE(cfg, nnx.Rngs(params=0))))
  rng = np.random.default_rng(seed)
  draw = lambda a: jnp.asarray(rng.standard_normal(a.shape) * (
      2 / np.sqrt(a.shape[-2]) if len(a.shape) >= 2 else 0.3), a.dtype)
  return graphdef, jax.tree.map(draw, abstract)


def test_moe_layer_under_mesh_equals_layer_without():
  shape = (2, 2, 2)  # all three axes split
  cfg = cfg_for(shape)
  graphdef, state = moe_state(cfg, seed=4)
  u = jnp.asarray(np.random.default_rng(5).standard_normal((B, T, D)), jnp.float32)
  forward = lambda state, u: nnx.merge(graphdef, state)(u)
  want_out, want_stats = jax.jit(forward)(state, u)
  mesh = sharding.make_mesh(*shape)
  with jax.set_mesh(mesh):
    assert expert_parallel.ambient_mesh() is not None
    sharded_forward = jax.jit(forward)
    hlo = sharded_forward.lower(state, u).as_text()
    got_out, got_stats = sharded_forward(state, u)
  assert 'all_to_all' in hlo  # the expert-parallel path ran, not the single-device one
  assert_close(got_out, want_out, 'MoE under mesh')
  np.testing.assert_array_equal(np.asarray(got_stats.expert_load),
                                np.asarray(want_stats.expert_load))
  assert float(got_stats.seq_balance_loss) == pytest.approx(float(want_stats.seq_balance_loss),
                                                            rel=1e-6)


def test_ambient_mesh_whenever_the_mesh_has_several_devices():
  assert expert_parallel.ambient_mesh() is None
  with jax.set_mesh(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])):  # one device
    assert expert_parallel.ambient_mesh() is None
  with jax.set_mesh(sharding.make_mesh(8, 1, 1)):   # data parallel only: still per device
    assert dict(expert_parallel.ambient_mesh().shape) == {'data': 8, 'expert': 1, 'plane': 1}
  with jax.set_mesh(sharding.make_mesh(1, 1, 8)):
    assert dict(expert_parallel.ambient_mesh().shape) == {'data': 1, 'expert': 1, 'plane': 8}


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape, cfg, batch, message', [
    ((1, 1, 8), moe_cfg(n_routed_experts=12), B, r'n_routed_experts=12 .* 1 x 8 = 8'),
    ((1, 8, 1), moe_cfg(n_group=4), B, r'n_group=4 .* \(8 nodes\): groups cannot map onto nodes'),
    ((1, 2, 4), moe_cfg(), 4, r'batch B=4 .* 1 x 2 x 4 = 8'),
    ((2, 2, 2), moe_cfg(), 12, r'batch B=12 .* 2 x 2 x 2 = 8'),
])
def test_sizes_that_cannot_split_are_errors(shape, cfg, batch, message):
  mesh = sharding.make_mesh(*shape)
  e = cfg.n_routed_experts
  args = [jax.ShapeDtypeStruct(s, dt) for s, dt in (
      ((batch, T, D), jnp.float32), ((batch * T, K), jnp.int32), ((batch * T, K), jnp.float32),
      ((e, D, F), jnp.float32), ((e, D, F), jnp.float32), ((e, F, D), jnp.float32))]
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda *a: expert_parallel.moe_ep(*a, mesh, cfg), *args)


# ---- traffic ------------------------------------------------------------------------------------

def traffic_by_loops(experts, E, X, P, data):
  """Direct count: token t lives on device t // (T / shards) in (data, expert, plane) order."""
  tokens = len(experts)
  per_device = tokens // (data * X * P)
  per_node, per_device_experts = E // X, E // (X * P)
  inter = intra = naive = 0
  for t, chosen in enumerate(experts):
    device = t // per_device
    home_node, home_plane = (device // P) % X, device % P
    nodes = {int(e) // per_node for e in chosen}
    inter += len(nodes - {home_node})
    naive += sum(int(e) // per_node != home_node for e in chosen)
    for n in nodes:  # arrives on home_plane of node n, fans out to the planes it needs there
      planes = {(int(e) % per_node) // per_device_experts for e in chosen if e // per_node == n}
      intra += len(planes - {home_plane})
  return inter, intra, naive


@pytest.mark.parametrize('data, X, P', [(1, 8, 4), (2, 4, 2)])
def test_traffic_counts_and_node_dedup(data, X, P):
  # V3-like routing: 64 experts in 8 groups (nodes) of 8, top-8 within 4 groups.
  cfg = ModelConfig(hidden_size=D, moe_intermediate_size=F, n_routed_experts=64,
                    num_experts_per_tok=8, n_group=8, topk_group=4)
  experts = node_limited_routing(256, 64, 8, 4, 8, seed=6)
  per_node = 64 // X
  assert max(len(set(row // per_node)) for row in experts) <= 4  # at most M nodes per token
  count = jax.jit(traffic_lib.traffic, static_argnums=(1, 2, 3, 4, 5))
  got = count(experts, cfg, X, P, 7168, data)
  inter, intra, naive = traffic_by_loops(experts, 64, X, P, data)
  assert (int(got['inter_node']), int(got['intra_node']), int(got['naive_inter_node'])) == (
      inter, intra, naive)
  assert float(got['inter_node_bytes']) == inter * 7168
  assert float(got['intra_node_bytes']) == intra * 7168
  assert float(got['naive_inter_node_bytes']) == naive * 7168
  # Dedup saves exactly (remote chosen experts) / (distinct remote nodes), summed over tokens.
  assert float(got['dedup_factor']) == pytest.approx(naive / inter, rel=1e-6)
  assert naive / inter > 1.5
  # The busiest device's (token, expert) pairs, within the static worst case.
  replica = np.arange(256) // (256 // data)
  load = np.bincount((replica[:, None] * X * P + experts // (64 // (X * P))).ravel(),
                     minlength=data * X * P)
  assert int(got['max_expert_pairs']) == load.max()
  assert load.max() <= int(got['expert_pairs_bound']) == X * P * (256 // (data * X * P)) * min(
      8, 64 // (X * P))

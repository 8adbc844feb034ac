"""DeepSeekMoE against float64 numpy references: the router (V3 eqs. 13-16, V2's softmax gate),
dropless dispatch/combine against a per-token loop, K = E against the dense sum, the two grouped
matmuls against each other (values and gradients), and the balance statistics (eqs. 17-20)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import grouped_matmul, router
from deepseek_jax.layers.moe import MoE

D, F = 32, 16


def moe_cfg(**changes) -> ModelConfig:
  base = dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=8, num_experts_per_tok=2,
              n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
              scoring_func='sigmoid', norm_topk_prob=True, use_router_bias=True)
  return ModelConfig(**{**base, **changes})


# ---- float64 numpy references -------------------------------------------------------------------

def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def route_ref(x, kernel, bias, cfg):
  """Per-token DeepSeek gate in float64 -> experts [T, K], gates [T, K], scores [T, E], margin.

  `margin` is the smallest gap at any discrete decision (group cut, expert cut), to show that
  float32 rounding cannot flip a choice on the test data."""
  logits = x.astype(np.float64) @ kernel.astype(np.float64)
  if cfg.scoring_func == 'sigmoid':
    scores = sigmoid(logits)
  else:
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
  T, E = scores.shape
  G, M, K = cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
  experts = np.zeros((T, K), np.int64)
  gates = np.zeros((T, K))
  margin = np.inf
  for t in range(T):
    choice = scores[t] + (0.0 if bias is None else bias.astype(np.float64))  # bias: choice only
    if G > 1:
      grouped = choice.reshape(G, E // G)
      if bias is not None:  # V3: sum of the two best biased scores of the group
        group_score = np.sort(grouped, axis=1)[:, -2:].sum(axis=1)
      else:                 # V2: the best score of the group
        group_score = grouped.max(axis=1)
      order = np.argsort(-group_score)
      if M < G:
        margin = min(margin, group_score[order[M - 1]] - group_score[order[M]])
      allowed = np.repeat(np.isin(np.arange(G), order[:M]), E // G)
      choice = np.where(allowed, choice, -np.inf)
    order = np.argsort(-choice)
    if K < E and np.isfinite(choice[order[K]]):
      margin = min(margin, choice[order[K - 1]] - choice[order[K]])
    chosen = order[:K]
    g = scores[t, chosen]
    if cfg.norm_topk_prob:
      g = g / g.sum()
    experts[t], gates[t] = chosen, g * cfg.routed_scaling_factor
  return experts, gates, scores, margin


def swiglu_ref(x, w_gate, w_up, w_down):
  gate, up = x @ w_gate, x @ w_up
  return (gate * sigmoid(gate) * up) @ w_down


def by_expert(experts, gates):
  """Rows sorted by expert id, so that chosen sets compare regardless of top-k order."""
  order = np.argsort(experts, axis=-1)
  return np.take_along_axis(experts, order, -1), np.take_along_axis(gates, order, -1)


# ---- (a) router ---------------------------------------------------------------------------------

ROUTER_CASES = {
    'v3_groups_bias': (dict(), True),
    'v3_16experts_k4': (dict(n_routed_experts=16, num_experts_per_tok=4), True),
    'sigmoid_bias_no_groups': (dict(n_group=1, topk_group=1), True),
    # With the max as group score, K <= topk_group never changes a pick; K = 3 > M = 2 does.
    'sigmoid_no_bias_groups_max': (dict(use_router_bias=False, num_experts_per_tok=3), False),
    'v2_lite_softmax': (dict(scoring_func='softmax', use_router_bias=False, n_group=1,
                             topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                             num_experts_per_tok=3), False),
    'v2_softmax_groups_max': (dict(scoring_func='softmax', use_router_bias=False,
                                   norm_topk_prob=False, routed_scaling_factor=16.0,
                                   num_experts_per_tok=3), False),
}


def router_inputs(cfg, with_bias, seed, T=64):
  rng = np.random.default_rng(seed)
  E = cfg.n_routed_experts
  x = rng.standard_normal((T, D)).astype(np.float32)
  kernel = (rng.standard_normal((D, E)) * 2 / np.sqrt(D)).astype(np.float32)
  bias = (rng.standard_normal(E) * 0.3).astype(np.float32) if with_bias else None
  return x, kernel, bias


@pytest.mark.parametrize('name', list(ROUTER_CASES))
def test_route_matches_float64_gate(name):
  changes, with_bias = ROUTER_CASES[name]
  cfg = moe_cfg(**changes)
  x, kernel, bias = router_inputs(cfg, with_bias, seed=len(name))
  want_experts, want_gates, want_scores, margin = route_ref(x, kernel, bias, cfg)
  assert margin > 1e-4  # no near-tie a float32 rounding could flip
  got = router.route(jnp.asarray(x), jnp.asarray(kernel),
                     None if bias is None else jnp.asarray(bias), cfg)
  assert got.experts.dtype == jnp.int32 and got.experts.shape == want_experts.shape
  np.testing.assert_allclose(np.asarray(got.scores), want_scores, rtol=1e-6, atol=1e-7)
  got_experts, got_gates = by_expert(np.asarray(got.experts), np.asarray(got.gates))
  want_experts, want_gates = by_expert(want_experts, want_gates)
  np.testing.assert_array_equal(got_experts, want_experts)
  np.testing.assert_allclose(got_gates, want_gates, rtol=1e-6, atol=1e-7)
  if cfg.norm_topk_prob:
    np.testing.assert_allclose(got_gates.sum(-1), cfg.routed_scaling_factor, rtol=1e-6)
  if cfg.n_group > 1:
    # Group limiting is exercised: some token's unrestricted top-K differs from its pick.
    free = moe_cfg(**{**changes, 'n_group': 1, 'topk_group': 1})
    free_experts = by_expert(route_ref(x, kernel, bias, free)[0], want_gates)[0]
    assert np.any(free_experts != want_experts)
    # ...and every token's experts come from at most topk_group groups.
    per_group = cfg.n_routed_experts // cfg.n_group
    assert max(len(set(row // per_group)) for row in got_experts) <= cfg.topk_group


# ---- (e) the bias picks, never weighs -----------------------------------------------------------

def test_bias_changes_picks_but_not_gate_values():
  cfg = moe_cfg(norm_topk_prob=False)
  x, kernel, _ = router_inputs(cfg, False, seed=11)
  rng = np.random.default_rng(12)
  biases = [np.zeros(8, np.float32), rng.standard_normal(8).astype(np.float32),
            np.array([-1, 1, -1, 1, -1, 1, -1, 1], np.float32)]
  scores = sigmoid(x.astype(np.float64) @ kernel.astype(np.float64))
  picks = []
  for bias in biases:
    got = router.route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), cfg)
    experts, gates = np.asarray(got.experts), np.asarray(got.gates)
    # Without normalisation each gate is 2.5 * sigmoid(u . e_i) of the chosen expert, bias or not.
    np.testing.assert_allclose(gates, 2.5 * np.take_along_axis(scores, experts, -1), rtol=1e-6)
    picks.append(by_expert(experts, gates)[0])
  assert np.mean(np.any(picks[0] != picks[1], axis=-1)) > 0.1
  assert np.mean(np.any(picks[0] != picks[2], axis=-1)) > 0.1
  # The +-1 bias pushes every pick onto the odd experts.
  assert np.all(picks[2] % 2 == 1)

  normed = moe_cfg()  # norm_topk_prob=True: gates are the normalised unbiased scores of the pick
  for bias in biases:
    got = router.route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), normed)
    experts = np.asarray(got.experts)
    chosen = np.take_along_axis(scores, experts, -1)
    np.testing.assert_allclose(np.asarray(got.gates), 2.5 * chosen / chosen.sum(-1, keepdims=True),
                               rtol=1e-6)


# ---- MoE layer with weights from numpy ----------------------------------------------------------

def moe_weights(cfg, seed, bias=None):
  rng = np.random.default_rng(seed)
  E, Fs = cfg.n_routed_experts, F * cfg.n_shared_experts
  normal = lambda shape, fan_in: (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  weights = dict(router_kernel=normal((D, E), D / 4), w_gate=normal((E, D, F), D),
                 w_up=normal((E, D, F), D), w_down=normal((E, F, D), F))
  if cfg.n_shared_experts:
    weights.update(shared_gate=normal((D, Fs), D), shared_up=normal((D, Fs), D),
                   shared_down=normal((Fs, D), Fs))
  if cfg.use_router_bias:
    weights['router_bias'] = (np.zeros(E, np.float32) if bias is None
                              else np.asarray(bias, np.float32))
  return weights


def build_moe(cfg, weights):
  """An MoE layer holding exactly `weights` (shapes from eval_shape: no random init to compile)."""
  with nnx.use_eager_sharding(False):
    moe = nnx.eval_shape(lambda: MoE(cfg, nnx.Rngs(params=0)))
  names = dict(shared_gate=('shared_experts', 'w_gate'), shared_up=('shared_experts', 'w_up'),
               shared_down=('shared_experts', 'w_down'))
  for name, value in weights.items():
    owner, attr = (moe, name) if name not in names else (getattr(moe, names[name][0]),
                                                          names[name][1])
    getattr(owner, attr).set_value(jnp.asarray(value))
  return moe


def run_moe(moe, u):
  graphdef, state = nnx.split(moe)
  out, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(u))
  return np.asarray(out), stats


def moe_ref(u, weights, cfg):
  """Per-token loop in float64: sum_k g_k FFN_{e_k}(u_t) + shared FFN(u_t)."""
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  tokens = u.reshape(-1, D).astype(np.float64)
  experts, gates, scores, margin = route_ref(tokens, weights['router_kernel'],
                                             weights.get('router_bias'), cfg)
  out = np.zeros_like(tokens)
  for t in range(tokens.shape[0]):
    for e, g in zip(experts[t], gates[t]):
      out[t] += g * swiglu_ref(tokens[t], w['w_gate'][e], w['w_up'][e], w['w_down'][e])
    if cfg.n_shared_experts:
      out[t] += swiglu_ref(tokens[t], w['shared_gate'], w['shared_up'], w['shared_down'])
  return out.reshape(u.shape), experts, margin


@pytest.mark.parametrize('impl', ['blocked', 'ragged_dot'])
def test_moe_with_all_experts_equals_dense_sum(impl):
  cfg = moe_cfg(num_experts_per_tok=8, n_group=1, topk_group=1, moe_matmul=impl)  # K = E
  rng = np.random.default_rng(3)
  weights = moe_weights(cfg, seed=4, bias=rng.standard_normal(8))  # bias cannot matter: K = E
  u = rng.standard_normal((2, 5, D)).astype(np.float32)
  got, stats = run_moe(build_moe(cfg, weights), u)
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  x = u.astype(np.float64)
  scores = sigmoid(np.einsum('BTD,DE->BTE', x, w['router_kernel']))
  gates = 2.5 * scores / scores.sum(-1, keepdims=True)               # [B, T, E]
  gate = np.einsum('BTD,EDF->BTEF', x, w['w_gate'])
  up = np.einsum('BTD,EDF->BTEF', x, w['w_up'])
  per_expert = np.einsum('BTEF,EFD->BTED', gate * sigmoid(gate) * up, w['w_down'])
  want = (np.einsum('BTED,BTE->BTD', per_expert, gates)
          + swiglu_ref(x, w['shared_gate'], w['shared_up'], w['shared_down']))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_array_equal(np.asarray(stats.expert_load), np.full(8, 10))


DROPLESS_CASES = {
    # experts 3 and 6 carry a bias of -5: never chosen, so they get no rows at all
    'starved_experts': dict(B=2, T=12, bias=[0.2, -0.1, 0.3, -5.0, 0.1, 0.0, -5.0, -0.2],
                            changes=dict()),
    # 3 tokens x K 2 over 16 experts: most experts idle; no shared expert
    'few_tokens': dict(B=1, T=3, bias=None, changes=dict(n_routed_experts=16, n_shared_experts=0)),
    'k4_of_16': dict(B=2, T=9, bias=None, changes=dict(n_routed_experts=16, num_experts_per_tok=4,
                                                       topk_group=3)),
}


@pytest.mark.parametrize('impl', ['blocked', 'ragged_dot'])
@pytest.mark.parametrize('case', list(DROPLESS_CASES))
def test_dropless_moe_matches_per_token_loop(case, impl):
  spec = DROPLESS_CASES[case]
  cfg = moe_cfg(moe_matmul=impl, **spec['changes'])
  rng = np.random.default_rng(5)
  E = cfg.n_routed_experts
  bias = spec['bias'] if spec['bias'] is not None else rng.standard_normal(E) * 0.2
  weights = moe_weights(cfg, seed=6, bias=bias)
  u = rng.standard_normal((spec['B'], spec['T'], D)).astype(np.float32)
  want, want_experts, margin = moe_ref(u, weights, cfg)
  assert margin > 1e-4
  got, stats = run_moe(build_moe(cfg, weights), u)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  load = np.asarray(stats.expert_load)
  np.testing.assert_array_equal(load, np.bincount(want_experts.ravel(), minlength=E))
  assert load.sum() == spec['B'] * spec['T'] * cfg.num_experts_per_tok
  assert np.any(load == 0)  # some expert gets no token, and nothing breaks
  if case == 'starved_experts':
    assert load[3] == 0 and load[6] == 0


# ---- (d) grouped matmuls ------------------------------------------------------------------------

def grouped_inputs(group_sizes, seed=7):
  rng = np.random.default_rng(seed)
  E, M = len(group_sizes), int(sum(group_sizes))
  x = rng.standard_normal((M, D)).astype(np.float32)
  w_gate = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(np.float32)
  w_up = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(np.float32)
  w_down = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(np.float32)
  cot = rng.standard_normal((M, D)).astype(np.float32)
  return x, np.asarray(group_sizes, np.int32), w_gate, w_up, w_down, cot


IMPLS = {
    'ragged_dot': lambda *a: grouped_matmul.expert_swiglu(*a, impl='ragged_dot'),
    'blocked': lambda *a: grouped_matmul.expert_swiglu(*a, impl='blocked'),
    # small blocks: experts spanning several blocks, many padded rows
    'blocked_4': lambda *a: grouped_matmul._blocked_swiglu(*a, block=4),
}


@pytest.mark.parametrize('group_sizes', [[33, 0, 7, 25, 15, 0], [0, 1, 0, 40, 2, 3]])
def test_grouped_matmuls_agree_in_value_and_gradient(group_sizes):
  x, sizes, w_gate, w_up, w_down, cot = grouped_inputs(group_sizes)
  # float64 reference per row
  row_expert = np.repeat(np.arange(len(sizes)), sizes)
  want = np.stack([swiglu_ref(x[m].astype(np.float64), w_gate[e].astype(np.float64),
                              w_up[e].astype(np.float64), w_down[e].astype(np.float64))
                   for m, e in enumerate(row_expert)])
  results = {}
  for name, impl in IMPLS.items():
    def loss(x, w_gate, w_up, w_down, impl=impl):
      out = impl(x, jnp.asarray(sizes), w_gate, w_up, w_down)
      return jnp.sum(out * cot), out
    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        *map(jnp.asarray, (x, w_gate, w_up, w_down)))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5, err_msg=name)
    results[name] = [np.asarray(g) for g in grads]
  for name in ('blocked', 'blocked_4'):
    for arg, g_ref, g in zip(('x', 'w_gate', 'w_up', 'w_down'), results['ragged_dot'],
                             results[name]):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * np.abs(g_ref).max(),
                                 err_msg=f'{name} d/d{arg}')
  # experts without rows get exactly zero weight gradient
  for g in results['blocked'][1:]:
    assert np.all(g[sizes == 0] == 0.0)
    assert np.all(np.abs(g[sizes > 0]).max(axis=(1, 2)) > 0)


# ---- (f) balance statistics ---------------------------------------------------------------------

@pytest.mark.parametrize('scoring', ['sigmoid', 'softmax'])
def test_sequence_balance_loss_and_expert_load(scoring):
  cfg = moe_cfg(scoring_func=scoring)
  B, T, E, K = 3, 10, 8, 2
  x, kernel, bias = router_inputs(cfg, True, seed=21, T=B * T)
  experts, _, scores, margin = route_ref(x, kernel, bias, cfg)
  assert margin > 1e-4
  routing = router.route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), cfg)
  losses = []
  for b in range(B):  # eqs. 17-20, one sequence at a time
    s = scores[b * T:(b + 1) * T]
    counts = np.bincount(experts[b * T:(b + 1) * T].ravel(), minlength=E)
    f = E / (K * T) * counts                                   # eq. 18
    p = (s / s.sum(-1, keepdims=True)).mean(0)                 # eqs. 19-20
    losses.append(np.sum(f * p))                               # eq. 17 without alpha
  got = float(router.sequence_balance_loss(routing, B, cfg))
  assert got == pytest.approx(np.mean(losses), rel=1e-6)
  load = np.asarray(router.expert_load(routing.experts, E))
  assert load.dtype == np.int32 and load.sum() == B * T * K
  np.testing.assert_array_equal(load, np.bincount(experts.ravel(), minlength=E))


def test_sequence_balance_loss_is_one_for_uniform_scores():
  # s_{i,t} all equal -> P_i = 1/E and sum_i f_i = E, so the loss is exactly 1 whatever is chosen.
  cfg = moe_cfg(n_group=1, topk_group=1)
  routing = router.route(jnp.ones((12, D)), jnp.zeros((D, 8)), None, cfg)
  assert float(router.sequence_balance_loss(routing, 3, cfg)) == pytest.approx(1.0, rel=1e-6)

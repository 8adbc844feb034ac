"""Weights kept in E4M3 with their scales (`ModelConfig.fp8_weights`,
`load_pretrained(keep_fp8=True)`): each kept weight times its scales is, bit for bit, the
dequantized import of the same FP8 checkpoint; the kept GEMM is the FP8 activations times the
stored weight (float64 numpy); kept and dequantized models both match transformers on the
dequantized weights; a (2, 2, 2) mesh holds the one-device blocks and gives its logits;
`quantize_weights` keeps each weight's sharding; `experiments.eval --keep_fp8` on a mesh; bad
requests are named and training refuses kept weights.

The checkpoint's head sizes make its 128-row scale blocks straddle our parameters as V3's do:
q_b_proj's 48 rows per head (V3: 192), kv_b_proj's 88, o_proj's 48 columns per head, kv_a's
latent and rope rows."""

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from deepseek_jax import fp8, sharding  # noqa: E402
from deepseek_jax import model as model_lib  # noqa: E402
from deepseek_jax.convert import export  # noqa: E402
from deepseek_jax.convert import hf as convert  # noqa: E402
from deepseek_jax.layers import linear  # noqa: E402
from tests.test_hf_parity import (hf_logits, hf_model, load_dequantized_, tokens_for,  # noqa: E402
                                  write_fp8)
from tests.test_hf_sharded import logits_on  # noqa: E402
from tests.tiny import FP8_WIDTHS, tiny_config  # noqa: E402

SIZES = dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=144, q_lora_rank=136,
             kv_lora_rank=136, qk_nope_head_dim=40, qk_rope_head_dim=8, v_head_dim=48)
VOCAB = 128  # tests/test_hf_parity.py BASE


def released(name: str, w) -> bool:
  """DeepSeek-V3's FP8 set (attention and FFN linears, not the router), plus the head, which no
  layer keeps: keep_fp8 dequantizes it."""
  return name == 'lm_head.weight' or (('.self_attn.' in name or '.mlp.' in name)
                                      and not name.endswith('.mlp.gate.weight'))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """(directory, HF model holding the dequantized weights)."""
  directory = tmp_path_factory.mktemp('fp8')
  model = hf_model(seed=4, **SIZES)
  load_dequantized_(model, write_fp8(model, directory, released))
  return directory, model


def flat(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def expand(scales: np.ndarray, rows: int) -> np.ndarray:
  """[..., ceil(rows / 128), O] -> [..., rows, O]: each scale over its 128 rows."""
  return np.repeat(scales.astype(np.float64), 128, axis=-2)[..., :rows, :]


def test_kept_weights_times_scales_are_the_dequantized_import(checkpoint):
  directory, _ = checkpoint
  _, plain = convert.load_pretrained(directory, scan_layers=False)
  cfg, kept = convert.load_pretrained(directory, scan_layers=False, keep_fp8=True)
  assert cfg.precision == 'fp8' and cfg.fp8_weights
  want, got = flat(plain), flat(kept)
  names = set()
  kept_bytes = float_bytes = 0
  for path, value in got.items():
    if str(path[-1]).endswith('_scale'):
      continue
    scale_path = path[:-1] + (f'{path[-1]}_scale',)
    if scale_path not in got:  # embedding, head (FP8 in the file: dequantized), norms, router
      assert value.dtype == np.float32 and np.array_equal(value, want[path]), path
      continue
    name, scales = path[-1], got[scale_path]
    assert value.dtype == ml_dtypes.float8_e4m3fn and scales.dtype == np.float32, path
    lead = 1 if name in ('w_gate', 'w_up', 'w_down') and value.ndim == 3 else 0  # routed experts
    in_dims = 2 if name == 'w_o' else 1
    shape = value.shape
    rows = int(np.prod(shape[lead:lead + in_dims]))
    matrix = value.astype(np.float64).reshape(shape[:lead] + (rows, -1))
    product = matrix * expand(scales.reshape(shape[:lead] + (scales.shape[lead], -1)), rows)
    # an E4M3 value times a float32 scale is exact in float64: one rounding to float32 remains
    assert np.array_equal(product.astype(np.float32).reshape(shape), want[path]), path
    names.add(name)
    kept_bytes += value.nbytes + scales.nbytes
    float_bytes += want[path].nbytes
  assert names == {'w_dq', 'w_uq', 'w_qr', 'w_dkv', 'w_kr', 'w_uk', 'w_uv', 'w_o', 'w_gate',
                   'w_up', 'w_down'}
  print(f'kept weights: {kept_bytes} bytes, float32: {float_bytes} '
        f'({kept_bytes / float_bytes:.3f})')
  assert kept_bytes < 0.3 * float_bytes


def test_kept_and_dequantized_both_match_hf(checkpoint):
  directory, model = checkpoint
  tokens = tokens_for(VOCAB, T=24, seed=5)
  reference = hf_logits(model, tokens)
  scale = np.abs(reference).max()
  cfg, plain = convert.load_pretrained(directory)
  _, kept = convert.load_pretrained(directory, keep_fp8=True)
  # the dequantized weights through the FP8 GEMMs of training: requantized in our 128x128 blocks
  requantized = nnx.merge(nnx.graphdef(model_lib.abstract(cfg.replace(precision='fp8'))),
                          nnx.state(plain))
  errors = {name: np.abs(logits_on(m, tokens) - reference).max()
            for name, m in (('dequantized', plain), ('kept', kept), ('requantized', requantized))}
  # HF again, each input of an FP8 layer rounded to E4M3 in 1x128 tiles as our GEMMs round it
  fp8_reference = hf_logits_fp8_activations(model, tokens)
  errors['kept vs HF with E4M3 activations'] = np.abs(logits_on(kept, tokens)
                                                      - fp8_reference).max()
  print({k: f'{v:.2e}' for k, v in errors.items()}, f'max |logit| {scale:.2f}')
  assert errors['dequantized'] <= 1e-4
  assert errors['kept vs HF with E4M3 activations'] <= 1e-4


def fake_fp8(x: torch.Tensor) -> torch.Tensor:
  """x [..., I] rounded as the FP8 GEMM's input: 1x128 tiles, scale amax / 448, E4M3 values."""
  I = x.shape[-1]
  pad = torch.nn.functional.pad(x, (0, -I % 128)).unflatten(-1, (-1, 128))
  s = pad.abs().amax(-1, keepdim=True) / 448.0
  s = torch.where(s > 0, s, torch.ones_like(s))
  values = (pad / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
  return (values * s).flatten(-2)[..., :I]


def hf_logits_fp8_activations(model, tokens: np.ndarray) -> np.ndarray:
  """`hf_logits` with every linear layer of attention and of the FFNs (the experts' too, not the
  router or the head) fed its input rounded by `fake_fp8`."""
  weights = {m.weight.data_ptr() for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ('self_attn.' in name or 'mlp.' in name)
             and not name.endswith('mlp.gate')}
  for name, p in model.named_parameters():
    if name.endswith(('experts.gate_up_proj', 'experts.down_proj')):
      weights.update(p[j].data_ptr() for j in range(p.shape[0]))
  plain, implementation = torch.nn.functional.linear, model.config._experts_implementation

  def linear_fn(x, w, b=None):
    return plain(fake_fp8(x) if w.data_ptr() in weights else x, w, b)

  torch.nn.functional.linear = linear_fn
  model.config._experts_implementation = 'eager'  # an F.linear per expert, not grouped_mm
  try:
    return hf_logits(model, tokens)
  finally:
    torch.nn.functional.linear = plain
    model.config._experts_implementation = implementation


def numpy_fp8_activations(x: np.ndarray) -> np.ndarray:
  """x [Z, I] as the FP8 GEMM sees it, in float64: 1x128 tiles along I, scale amax / 448,
  values rounded to E4M3 by ml_dtypes."""
  Z, I = x.shape
  out = np.empty((Z, I))
  for start in range(0, I, 128):
    tile = x[:, start:start + 128].astype(np.float64)
    s = (np.abs(tile).max(-1, keepdims=True) / 448.0).astype(np.float32).astype(np.float64)
    values = (tile / s).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    out[:, start:start + 128] = values.astype(np.float64) * s
  return out


def test_kept_gemm_is_the_fp8_activations_times_the_stored_weight():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 300)).astype(np.float32)
  w = rng.standard_normal((300, 200)).astype(np.float32) * np.linspace(0.1, 3, 200)
  kept = fp8.quantize_weight(jnp.asarray(w))
  values, scales = np.asarray(kept.values), np.asarray(kept.scales)
  assert values.dtype == ml_dtypes.float8_e4m3fn and scales.shape == (3, 200)
  # one scale per column of each 128-row block: amax / 448
  np.testing.assert_allclose(scales[1, 7], np.abs(w[128:256, 7]).max() / 448.0, rtol=1e-6)
  stored = values.astype(np.float64) * expand(scales, 300)
  assert np.abs(stored - w).max() <= np.abs(w).max() * 2.0 ** -4  # E4M3: 3 mantissa bits
  want = numpy_fp8_activations(x) @ stored
  got = np.asarray(linear.linear(jnp.asarray(x), kept, precision='fp8'))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # per expert: [E, Z, I] x [E, I, O]
  experts = fp8.quantize_weight(jnp.asarray(np.stack([w, -2 * w])), lead=1)
  batched = np.asarray(linear.batched_linear(jnp.asarray(np.stack([x, x])), experts,
                                             precision='fp8'))
  np.testing.assert_allclose(batched[0], got, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  np.testing.assert_allclose(batched[1], -2 * got, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match="needs precision='fp8'"):
    linear.linear(jnp.asarray(x), kept)


def test_kept_import_on_a_mesh_gives_the_single_device_model(checkpoint):
  """Each device holds its block of the kept values and scales, bit for bit; the logits agree to
  float rounding except where a rounding flip cascades. FP8 rounding is a step function: a
  summation-order difference of 1e-7 can move an activation one E4M3 step (~6%) or flip a near
  tie of the router, and this tiny random model amplifies that (its E4M3 activations alone move
  the logits by 73% of their scale). Measured: median position 2.9e-6, 56 of 128 positions past
  1e-4 (later tokens of the sequences where it happened), at most 17% of the scale; the
  float-weight FP8 model (precision='fp8', weights requantized online) flips the same way."""
  directory, _ = checkpoint
  tokens = np.concatenate([tokens_for(VOCAB, seed=s) for s in range(4)])  # B 8: one per device
  _, one = convert.load_pretrained(directory, keep_fp8=True)
  mesh = sharding.make_mesh(2, 2, 2)
  _, sharded = convert.load_pretrained(directory, mesh=mesh, rules=sharding.rules(fsdp=True),
                                       keep_fp8=True)
  whole = flat(one)
  for path, variable in nnx.to_flat_state(nnx.state(sharded)):
    for shard in variable.get_value().addressable_shards:
      assert np.array_equal(np.asarray(shard.data), whole[path][shard.index]), path
  experts = sharded.moe_layers.ffn.w_gate.get_value()  # [L, E, D, F], experts over 4 devices
  assert experts.dtype == ml_dtypes.float8_e4m3fn
  assert {s.data.shape[1] for s in experts.addressable_shards} == {experts.shape[1] // 4}
  want, got = logits_on(one, tokens), logits_on(sharded, tokens, mesh)
  scale = np.abs(want).max()
  per_position = np.abs(got - want).max(-1)
  print(f'median {np.median(per_position):.1e}, {(per_position > 1e-4).sum()} of '
        f'{per_position.size} past 1e-4, max {per_position.max() / scale:.0%} of the scale')
  assert np.median(per_position) <= 1e-5 * scale
  assert per_position.max() <= 0.25 * scale


def test_bad_requests_are_named(checkpoint, tmp_path):
  hf_model(seed=4, **SIZES).save_pretrained(tmp_path)  # float32, no FP8 at all
  with pytest.raises(ValueError, match=r"keep_fp8: tensor 'model\.layers\.0\.self_attn\.q_a_proj"
                                       r"\.weight' \(model\.safetensors\) is float32"):
    convert.load_pretrained(tmp_path, keep_fp8=True)
  with pytest.raises(ValueError, match=r"ModelConfig\.fp8_weights=True: needs precision='fp8'"):
    tiny_config(fp8_weights=True)
  _, kept = convert.load_pretrained(checkpoint[0], keep_fp8=True)
  with pytest.raises(ValueError, match='fp8_weights=True'):
    export.save_pretrained(kept, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_training_a_kept_model_is_refused():
  """The loop and `experiments.compile --what=train` build their state here; inference (and its
  ahead-of-time compile, `--what=decode`) takes the config."""
  from deepseek_jax.train import config as train_config
  from deepseek_jax.train import loop
  from experiments.configs import tiny
  config = tiny.get_config()
  config.model.update(FP8_WIDTHS, precision='fp8', fp8_weights=True)
  run = train_config.resolve(config)
  with pytest.raises(ValueError, match='fp8_weights=True: weights kept in E4M3 are for inference'):
    loop.train_state_layout(run, 0, None, None)


def test_quantize_weights_keeps_each_weights_sharding():
  """A workdir's float weights kept in E4M3 on a mesh (`inference.load.load(keep_fp8=True)`):
  values sharded as their weights, scales as the weights' output dims, the values those of the
  one-device quantization."""
  from deepseek_jax.inference import load
  from tests.tiny import random_model
  cfg = tiny_config(**FP8_WIDTHS, precision='fp8')
  model = random_model(cfg)
  mesh = sharding.make_mesh(2, 2, 2)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.variable_shardings(state, mesh, sharding.rules(True)))
  kept = load.quantize_weights(nnx.merge(graphdef, state))
  whole = flat(load.quantize_weights(model))
  layers = kept.moe_layers.ffn
  for name in ('w_gate', 'w_down'):
    w, scales = getattr(layers, name).get_value(), getattr(layers, f'{name}_scale').get_value()
    assert w.sharding.spec == state['moe_layers']['ffn'][name].get_value().sharding.spec
    weight_spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
    assert tuple(scales.sharding.spec) == weight_spec[:2] + (None,) + weight_spec[3:]
    for shard in w.addressable_shards:
      path = ('moe_layers', 'ffn', name)
      assert np.array_equal(np.asarray(shard.data), whole[path][shard.index])


@pytest.mark.slow
def test_eval_keeps_fp8_on_a_mesh(tmp_path):
  """`experiments.eval --keep_fp8` on a (1, 2, 4) mesh: the cross-entropy of the one-device kept
  model's logits (float64 numpy, `test_eval.reference`), up to the FP8 rounding flips of a
  different summation order (see the mesh test above)."""
  from tests.test_eval import TEXT, B, T, reference, run_eval
  hf = hf_model(seed=4, vocab_size=256, hidden_size=160, intermediate_size=272,
                moe_intermediate_size=144, q_lora_rank=136)
  write_fp8(hf, tmp_path, released)
  (tmp_path / 'text.txt').write_text(TEXT)
  out = run_eval(f'--hf={tmp_path}', f'--data.path={tmp_path / "text.txt"}', f'--seq_len={T}',
                 f'--batch_size={B}', '--max_batches=2', '--mesh=1,2,4', '--keep_fp8')
  want, tokens = reference(tmp_path, 2, keep_fp8=True)
  print(f'eval_loss {out["eval_loss"]:.6f}, one device {want:.6f}')
  assert out['fp8_weights'] and out['tokens'] == tokens
  assert abs(out['eval_loss'] - want) <= 2e-3 * want  # measured 3.1e-4

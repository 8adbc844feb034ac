"""`convert.export.save_pretrained` against transformers and against our own importer.

Models are random (tests/tiny.py: random norm weights and router biases, group-limited sigmoid
routing) with every parameter rounded through BF16 first, so a BF16 export loses nothing: HF's
logits must match ours, and `load_pretrained` must give back the same bits, in both layer layouts.
FP8 is checked block by block against E4M3's rounding bound.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import config as config_lib
from deepseek_jax import model as model_lib
from deepseek_jax.convert import export, hf, safetensors_io
from deepseek_jax.layers.param import RouterBias
from tests.tiny import FP8_WIDTHS, full_logits, random_model, tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUANTIZED = (r'\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj'
             r'|down_proj)\.weight$')  # the release's F8_E4M3 tensors, by module name


def bf16_model(cfg, seed=0):
  """A random model whose float32 parameters are all BF16-representable."""
  graphdef, state = nnx.split(random_model(cfg, seed))
  state = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state)
  return nnx.merge(graphdef, state)


def flat(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def headers(directory):
  """{file: {name: (dtype, shape, data bytes)}} from the safetensors headers."""
  out = {}
  for path in sorted(directory.glob('*.safetensors')):
    f = safetensors_io.SafetensorsFile(path)
    out[path.name] = {n: (f.dtype(n), f.shape(n), f.get(n).nbytes) for n in f.keys()}
  return out


def block_amax(w):
  """max |w| of each 128x128 block [ceil(out/128), ceil(in/128)], edge blocks included."""
  rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
  padded = np.zeros((rows * 128, cols * 128), np.float32)
  padded[:w.shape[0], :w.shape[1]] = np.abs(w)
  return padded.reshape(rows, 128, cols, 128).max(axis=(1, 3))


def test_transformers_loads_the_export_with_our_logits(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  # YaRN (factor 4 over 16 positions, mscale 0.707 / 1) so the rope keys are read too; T 20 > 16
  cfg = tiny_config(rope_theta=10.0, rope_factor=4.0, rope_original_max_position=16,
                    max_position_embeddings=64, rope_mscale=0.707, rope_mscale_all_dim=1.0)
  model = bf16_model(cfg)
  export.save_pretrained(model, tmp_path / 'hf', progress=False)
  theirs, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
      tmp_path / 'hf', dtype=torch.float32, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['mismatched_keys']
  mtp = f'model.layers.{cfg.num_layers}.'  # HF's DeepseekV3 has no MTP module: only these extra
  assert info['unexpected_keys'] and all(k.startswith(mtp) for k in info['unexpected_keys'])
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
  with torch.no_grad():
    hf_logits = theirs(torch.from_numpy(tokens)).logits.numpy()
  delta = float(np.max(np.abs(hf_logits - full_logits(model, tokens.astype(np.int32)))))
  print(f'export -> transformers: max |dlogit| = {delta:.2e}')
  assert delta <= 1e-4


@pytest.mark.parametrize('scan_layers,overrides', [
    (True, {}), (False, dict(q_lora_rank=None, first_k_dense=0, mtp_depth=2))])
def test_round_trip_through_our_importer_is_bitwise(tmp_path, scan_layers, overrides):
  cfg = tiny_config(scan_layers=scan_layers, **overrides)
  model = bf16_model(cfg, seed=1)
  export.save_pretrained(model, tmp_path / 'hf', progress=False)
  loaded_cfg, loaded = hf.load_pretrained(tmp_path / 'hf', scan_layers=scan_layers)
  ignored = {'init_std', *config_lib.IMPLEMENTATION_FIELDS}  # the importer keeps init_std 0.006
  assert ({k: v for k, v in loaded_cfg.to_dict().items() if k not in ignored}
          == {k: v for k, v in cfg.to_dict().items() if k not in ignored})
  ours, back = flat(model), flat(loaded)
  assert set(ours) == set(back)
  differ = [p for p in ours if not np.array_equal(ours[p], back[p])]
  assert not differ, differ


def test_names_dtypes_and_shards(tmp_path):
  cfg = tiny_config()
  D, F, L = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_layers
  limit = 6_000
  result = export.save_pretrained(bf16_model(cfg), tmp_path / 'hf', max_shard_bytes=limit,
                                  progress=False)
  out = tmp_path / 'hf'
  files = headers(out)
  assert len(files) > 10 and sorted(result['files'][2:]) == sorted(files)
  assert sorted(p.name for p in out.iterdir()) == sorted(result['files'])
  assert sorted(files) == [f'model-{k:05d}-of-{len(files):05d}.safetensors'
                           for k in range(1, len(files) + 1)]
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  assert index['weight_map'] == {n: f for f, tensors in files.items() for n in tensors}
  assert index['metadata']['total_size'] == sum(
      b for tensors in files.values() for _, _, b in tensors.values())
  for tensors in files.values():  # within the limit, or one tensor alone
    assert sum(b for _, _, b in tensors.values()) <= limit or len(tensors) == 1
  tensors = {n: t for f in files.values() for n, t in f.items()}
  assert tensors['model.layers.1.mlp.experts.7.down_proj.weight'][:2] == (export.BF16, (D, F))
  assert tensors['model.layers.2.mlp.gate.e_score_correction_bias'][:2] == (np.float32, (8,))
  assert {d for n, (d, _, _) in tensors.items() if 'e_score' not in n} == {export.BF16}
  assert not any(n.endswith(hf.SCALE_SUFFIX) for n in tensors)
  checkpoint = safetensors_io.Checkpoint(out)  # the MTP layer's copies of embedding and head
  for copy, original in ((f'model.layers.{L}.embed_tokens.weight', 'model.embed_tokens.weight'),
                         (f'model.layers.{L}.shared_head.head.weight', 'lm_head.weight')):
    assert np.array_equal(checkpoint.get(copy), checkpoint.get(original))
  config = json.loads((out / 'config.json').read_text())
  assert config['torch_dtype'] == 'bfloat16' and 'quantization_config' not in config
  assert config['num_nextn_predict_layers'] == 1 and config['topk_method'] == 'noaux_tc'


def test_fp8_blocks_and_round_trip(tmp_path):
  # D 160, F 272 / 144, Q 136: several 128x128 blocks with ragged edges
  cfg = tiny_config(**{**FP8_WIDTHS, 'hidden_size': 160, 'intermediate_size': 272,
                       'moe_intermediate_size': 144, 'q_lora_rank': 136, 'kv_lora_rank': 40})
  model = bf16_model(cfg, seed=2)
  export.save_pretrained(model, tmp_path / 'bf16', progress=False)
  export.save_pretrained(model, tmp_path / 'fp8', fp8=True, max_shard_bytes=200_000,
                         progress=False)
  exact, stored = (safetensors_io.Checkpoint(tmp_path / d) for d in ('bf16', 'fp8'))
  names = exact.names()
  fp8_names = {n for n in names if re.search(QUANTIZED, n)}
  assert stored.names() == names | {n + hf.SCALE_SUFFIX for n in fp8_names}
  assert any('.mlp.experts.' in n for n in fp8_names) and any('eh_proj' in n for n in names)
  for name in names:
    w = np.asarray(exact.get(name), np.float32)
    if name not in fp8_names:  # embedding, head, router, eh_proj, norms, bias: as BF16 export
      assert stored.dtype(name) == exact.dtype(name) and np.array_equal(stored.get(name), w)
      continue
    q, scale = stored.get(name), stored.get(name + hf.SCALE_SUFFIX)
    assert q.dtype == hf.FP8 and stored.file_of(name) == stored.file_of(name + hf.SCALE_SUFFIX)
    assert scale.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    per_element = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
    # E4M3 keeps 3 mantissa bits: half an ulp is <= 2^-4 |w|, or 2^-10 x scale when subnormal
    error = np.abs(hf.dequantize(q, scale) - w)
    assert np.all(error <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * per_element), name
    assert np.all(block_amax(np.asarray(q, np.float32)) == export.FP8_MAX), name  # amax -> 448
  config = json.loads((tmp_path / 'fp8' / 'config.json').read_text())
  assert config['quantization_config'] == {
      'quant_method': 'fp8', 'fmt': 'e4m3', 'activation_scheme': 'dynamic',
      'weight_block_size': [128, 128]}
  _, loaded = hf.load_pretrained(tmp_path / 'fp8')
  ours, back = flat(model), flat(loaded)
  for path, value in ours.items():
    bound = 2.0 ** -4 * np.abs(value) + 2.0 ** -10 * np.abs(value).max() / export.FP8_MAX
    assert np.all(np.abs(back[path] - value) <= bound * (1 + 1e-6)), path


def test_v3_fp8_plan_matches_the_release():
  """From shapes alone (an abstract model): DeepSeek-V3's FP8 release holds 91,991 tensors of
  688,574,839,360 bytes (its safetensors headers: E4M3 weights with float32 scales, float32
  router biases, the rest BF16, MTP layer 61 with its embedding and head copies)."""
  cfg = config_lib.ModelConfig()
  state = nnx.state(model_lib.abstract(cfg), (nnx.Param, RouterBias))
  _, entries = export.plan(cfg, dict(nnx.to_flat_state(state)), fp8=True)
  assert len(entries) + sum(e.dtype == hf.FP8 for e in entries) == 91_991
  assert sum(e.nbytes for e in entries) == 688_574_839_360
  shards = export.shard(entries, 5e9)
  assert len(shards) == 138 and max(sum(e.nbytes for e in s) for s in shards) <= 5e9


def test_quantize_fp8_scales_each_block_by_its_amax():
  w = np.random.default_rng(0).standard_normal((130, 260)).astype(np.float32)
  w[128:, :128] *= 1e-3  # a ragged edge block far smaller than the rest
  w[:128, 256:] = 0.0    # and an all-zero one
  q, scale = export.quantize_fp8(w)
  assert scale.shape == (2, 3)
  assert scale[1, 0] == pytest.approx(np.abs(w[128:, :128]).max() / 448, rel=1e-6)
  assert np.all(np.asarray(q[:128, 256:], np.float32) == 0)
  error = np.abs(hf.dequantize(q, scale) - w)
  assert np.all(error <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * np.repeat(np.repeat(
      scale, 128, 0), 128, 1)[:130, :260])


def test_refuses_a_non_empty_out_and_unsupported_configs(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  model = bf16_model(tiny_config())
  with pytest.raises(ValueError, match=f'{out} exists and is not empty'):
    export.save_pretrained(model, out, progress=False)
  assert [p.name for p in out.iterdir()] == ['keep.txt'] and len(list(tmp_path.iterdir())) == 1
  for field, value in (('use_router_bias', False), ('scoring_func', 'softmax')):
    with pytest.raises(ValueError, match=f'ModelConfig.{field}={value!r}'):
      export.save_pretrained(bf16_model(tiny_config(**{field: value})), tmp_path / field,
                             progress=False)
  assert len(list(tmp_path.iterdir())) == 1  # nothing written
  empty = tmp_path / 'empty'  # an existing empty directory is fine
  empty.mkdir()
  export.save_pretrained(model, empty, progress=False)
  assert (empty / 'config.json').is_file()


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
  calls = []

  def failing_write(path, tensors, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError('disk full')
    write(path, tensors, metadata)

  write = safetensors_io.write_file
  monkeypatch.setattr(safetensors_io, 'write_file', failing_write)
  with pytest.raises(OSError, match='disk full'):
    export.save_pretrained(bf16_model(tiny_config()), tmp_path / 'out', max_shard_bytes=20_000,
                           progress=False)
  assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_command_reexports_with_fp8_and_the_tokenizer(tmp_path):
  """experiments.export on a Hugging Face directory (load.load reads either kind); then the
  tokenizer loads through transformers' AutoTokenizer, and a second run refuses the same --out."""
  transformers = pytest.importorskip('transformers')
  tokenizers = pytest.importorskip('tokenizers')
  source = tmp_path / 'source'
  export.save_pretrained(bf16_model(tiny_config()), source, progress=False)
  words = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(['[UNK]', 'the', 'cat', 'sat'])}, unk_token='[UNK]'))
  words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  words.save(str(source / 'tokenizer.json'))
  command = [sys.executable, '-m', 'experiments.export', f'--workdir={source}',
             f'--out={tmp_path / "fp8"}', '--fp8', '--max_shard_gb=0.00005']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['fp8'] and len(result['files']) > 4 and 'tokenizer.json' in result['files']
  assert result['bytes'] == sum((tmp_path / 'fp8' / f).stat().st_size for f in result['files'])
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / 'fp8')
  assert tokenizer('the cat sat dog')['input_ids'] == [1, 2, 3, 0]
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  assert again.returncode != 0 and f'error: save_pretrained: {tmp_path / "fp8"}' in again.stderr

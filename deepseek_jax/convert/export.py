"""Our model -> a Hugging Face DeepSeek-V3 directory (what transformers, vLLM and SGLang read).

The importer's `hf.tensor_plan` is the one statement of tensor names and layouts, and export walks
it backwards. Each `Rule.convert` (HF sources -> our targets) only slices, transposes and reshapes,
so it is a linear permutation of elements and `jax.linear_transpose` of it is its exact inverse:
no layout is written down twice. Names, shapes and shards are planned from shapes alone and the
config checked before anything is written; values leave the device one HF tensor at a time, and
the host holds at most one shard's tensors. Everything is written into a hidden sibling of `out`,
renamed to `out` at the end, so an interrupted export leaves nothing half-written there.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import secrets
import shutil
import typing

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tqdm
from flax import nnx

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.convert import hf, safetensors_io
from deepseek_jax.layers.param import RouterBias

FP8_BLOCK = (128, 128)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
QUANTIZATION_CONFIG = {'quant_method': 'fp8', 'fmt': 'e4m3', 'activation_scheme': 'dynamic',
                       'weight_block_size': list(FP8_BLOCK)}
BF16 = np.dtype(ml_dtypes.bfloat16)
# The MTP layers' own copies of the shared embedding and head, as the release stores them.
COPY_OF = {'.embed_tokens.weight': 'model.embed_tokens.weight',
           '.shared_head.head.weight': 'lm_head.weight'}
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json')


# ---- what can be exported ----------------------------------------------------------------------

def check_exportable(cfg: ModelConfig) -> None:
  """HF's DeepseekV3 routes with sigmoid scores and the bias (`noaux_tc`) and nothing else, so a
  model with MoE layers that routes otherwise has no HF equivalent: a ValueError names the field.
  A model keeping its weights in E4M3 (`fp8_weights`) is refused too: export the checkpoint it
  was loaded from as it is, or load it with keep_fp8=False."""
  if cfg.fp8_weights:
    raise ValueError('ModelConfig.fp8_weights=True: the export writes float parameters (and '
                     'quantizes them itself with fp8=True); load the model with keep_fp8=False')
  if cfg.num_moe_layers == 0 and cfg.mtp_depth == 0:
    return  # no router anywhere
  if cfg.scoring_func != 'sigmoid':
    raise ValueError(f'ModelConfig.scoring_func={cfg.scoring_func!r}: HF DeepseekV3 scores '
                     "experts with 'sigmoid' only")
  if not cfg.use_router_bias:
    raise ValueError('ModelConfig.use_router_bias=False: HF DeepseekV3 always ranks experts by '
                     'score + e_score_correction_bias and scores groups by their top-2 sum')


def hf_config(cfg: ModelConfig, fp8: bool = False) -> dict:
  """`config.json`: `hf.config_to_hf`, the dtype, FP8's quantization_config, and the rope keys
  transformers 4 reads (`rope_theta`, `rope_scaling`), equal to `rope_parameters`."""
  config = hf.config_to_hf(cfg)
  rope = dict(config['rope_parameters'])
  config['rope_theta'] = rope.pop('rope_theta')
  kind = rope.pop('rope_type')
  config['rope_scaling'] = None if kind == 'default' else {'type': kind, 'rope_type': kind, **rope}
  config['torch_dtype'] = 'bfloat16'
  if fp8:
    config['quantization_config'] = dict(QUANTIZATION_CONFIG)
  return config


# ---- the plan: every tensor, from shapes alone -------------------------------------------------

class Entry(typing.NamedTuple):
  """One HF tensor: the plan rule that yields it and which of that rule's sources it is."""
  name: str
  rule: int
  source: int
  shape: tuple[int, ...]
  dtype: np.dtype  # as written: BF16, float32 (the router bias, as released) or E4M3

  @property
  def nbytes(self) -> int:
    size = math.prod(self.shape) * self.dtype.itemsize
    if self.dtype == hf.FP8:  # its float32 `_scale_inv` sibling travels with it
      size += math.prod(hf.scale_shape(self.shape, FP8_BLOCK)) * 4
    return size


def quantized(name: str, shape: tuple[int, ...]) -> bool:
  """The weights the release stores in FP8: every linear layer of attention and of the FFNs
  (dense, shared, routed experts). Embedding, head, router (`mlp.gate`), `eh_proj` and norms stay
  BF16 (DeepSeek-V3's safetensors headers)."""
  return (len(shape) == 2 and name.endswith('.weight') and not name.endswith('.mlp.gate.weight')
          and ('.self_attn.' in name or '.mlp.' in name))


def _dtype(name: str, shape: tuple[int, ...], fp8: bool) -> np.dtype:
  if name.endswith('.e_score_correction_bias'):
    return np.dtype(np.float32)
  return hf.FP8 if fp8 and quantized(name, shape) else BF16


def _locate(cfg: ModelConfig, leaves: dict, target: tuple) -> tuple[tuple, tuple[int, ...]]:
  """A plan target -> (leaf path, index into that leaf), as the importer places it."""
  path, index = hf.target_location(cfg, target)
  if path not in leaves:
    raise ValueError(f'export: the plan names {target}, which is no parameter of the model')
  return path, index


def _forward(rule: hf.Rule):
  return lambda *sources: tuple(rule.convert(*sources))


def plan(cfg: ModelConfig, leaves: dict, fp8: bool) -> tuple[list[hf.Rule], list[Entry]]:
  """The importer's rules for `cfg` (one tensor per routed expert, as released) and every tensor
  to write. Raises if a rule's targets do not fit the model or a parameter would be left out."""
  rules, copies = hf.tensor_plan(cfg, set())
  entries, used, where = [], set(), {}
  for r, rule in enumerate(rules):
    primals = [jax.ShapeDtypeStruct(s, jnp.float32) for s in rule.sources.values()]
    shapes = [o.shape for o in jax.eval_shape(_forward(rule), *primals)]
    for target, shape in zip(rule.targets, shapes):
      path, index = _locate(cfg, leaves, target)
      leaf_shape = leaves[path].get_value().shape
      if len(index) > len(leaf_shape) or tuple(leaf_shape[len(index):]) != tuple(shape):
        raise ValueError(f'export: {target} is {leaf_shape} at {index} in the model, the plan '
                         f'makes {tuple(shape)} of it from {list(rule.sources)[:3]}')
      used.add(path)
    for s, (name, shape) in enumerate(rule.sources.items()):
      entries.append(Entry(name, r, s, tuple(shape), _dtype(name, shape, fp8)))
      where[name] = entries[-1]
  left_out = sorted(set(leaves) - used, key=str)
  if left_out:
    raise ValueError(f'export: no Hugging Face tensor holds {left_out[:8]}')
  for name, shape in copies.items():
    original = where[next(o for suffix, o in COPY_OF.items() if name.endswith(suffix))]
    assert original.shape == tuple(shape), (name, shape, original.shape)
    entries.append(original._replace(name=name))
  return rules, entries


def shard(entries: list[Entry], max_bytes: float) -> list[list[Entry]]:
  """Consecutive entries, each group's bytes <= max_bytes (a bigger tensor alone in its file)."""
  shards, size = [[]], 0
  for entry in entries:
    if shards[-1] and size + entry.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += entry.nbytes
  return shards if shards[0] else []


# ---- values ------------------------------------------------------------------------------------

def quantize_fp8(w: np.ndarray, block: tuple[int, int] = FP8_BLOCK
                 ) -> tuple[np.ndarray, np.ndarray]:
  """[out, in] float -> (E4M3 weight, float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)]):
  scale = amax / 448 per block, ragged edge blocks included; `hf.dequantize` inverts it."""
  out_dim, in_dim = w.shape
  rows, cols = hf.scale_shape(w.shape, block)
  padded = np.zeros((rows * block[0], cols * block[1]), np.float32)
  padded[:out_dim, :in_dim] = w
  blocks = padded.reshape(rows, block[0], cols, block[1])
  amax = np.abs(blocks).max(axis=(1, 3))
  scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)  # all-zero block: any scale
  q = np.clip(blocks / scale[:, None, :, None], -FP8_MAX, FP8_MAX).reshape(padded.shape)
  return q[:out_dim, :in_dim].astype(hf.FP8), scale


class _Sources:
  """The HF tensors of one rule at a time, computed where the parameters live and then fetched."""

  def __init__(self, cfg: ModelConfig, leaves: dict, rules: list[hf.Rule]):
    self.cfg, self.leaves, self.rules = cfg, leaves, rules

  def __call__(self, r: int) -> list[np.ndarray]:
    rule = self.rules[r]
    targets = []
    for target in rule.targets:
      path, index = _locate(self.cfg, self.leaves, target)
      value = self.leaves[path].get_value()
      targets.append(value[index] if index else value)
    # in the parameters' own dtype: a permutation's transpose is exact in any, and a float32
    # copy of the embedding would double the host peak
    dtype = jnp.result_type(*targets)
    primals = [jax.ShapeDtypeStruct(s, dtype) for s in rule.sources.values()]
    inverse = jax.linear_transpose(_forward(rule), *primals)
    return [np.asarray(jax.device_get(s))
            for s in inverse(tuple(t.astype(dtype) for t in targets))]


def _encode(entry: Entry, value: np.ndarray) -> dict[str, np.ndarray]:
  if entry.dtype == hf.FP8:
    q, scale = quantize_fp8(value)
    return {entry.name: q, entry.name + hf.SCALE_SUFFIX: scale}
  return {entry.name: value.astype(entry.dtype, copy=False)}


# ---- the directory -----------------------------------------------------------------------------

def _tokenizer_file(tokenizer_path) -> pathlib.Path | None:
  """`tokenizer_path` itself, or the `tokenizer.json` in that directory; it must exist."""
  if tokenizer_path is None:
    return None
  source = pathlib.Path(tokenizer_path)
  source = source / TOKENIZER_FILES[0] if source.is_dir() else source
  if not source.is_file():
    raise FileNotFoundError(f'save_pretrained: tokenizer {source} not found')
  return source


def _copy_tokenizer(source: pathlib.Path, directory: pathlib.Path) -> list[str]:
  """`tokenizer.json` and the `tokenizer_config.json` beside it (else a minimal one naming the
  fast tokenizer class, so that AutoTokenizer loads it)."""
  shutil.copyfile(source, directory / TOKENIZER_FILES[0])
  beside = source.parent / TOKENIZER_FILES[1]
  if beside.is_file():
    shutil.copyfile(beside, directory / TOKENIZER_FILES[1])
  else:
    (directory / TOKENIZER_FILES[1]).write_text(
        json.dumps({'tokenizer_class': 'PreTrainedTokenizerFast'}, indent=2) + '\n')
  return list(TOKENIZER_FILES)


def _check_out(out: pathlib.Path) -> None:
  if out.exists() and not out.is_dir():
    raise ValueError(f'save_pretrained: {out} exists and is not a directory')
  if out.is_dir() and any(out.iterdir()):
    raise ValueError(f'save_pretrained: {out} exists and is not empty; choose a new directory')


def save_pretrained(model: model_lib.DeepSeekV3, out, *, fp8: bool = False,
                    max_shard_bytes: float = 5e9, tokenizer_path=None,
                    progress: bool = True) -> dict:
  """Writes `model` (either layer layout) as a DeepseekV3ForCausalLM directory at `out`:
  config.json, `model-0000k-of-0000n.safetensors` shards of at most `max_shard_bytes` of tensors
  each, `model.safetensors.index.json`, and the tokenizer when `tokenizer_path` (a tokenizer.json
  or a directory holding one) is given. Weights are BF16; with `fp8`, the weights the release
  quantizes are E4M3 in 128x128 blocks. Returns {'out', 'files', 'bytes', 'tensors'}."""
  cfg, out = model.cfg, pathlib.Path(out)
  check_exportable(cfg)
  _check_out(out)
  if max_shard_bytes <= 0:
    raise ValueError(f'save_pretrained: max_shard_bytes={max_shard_bytes} must be positive')
  leaves = dict(nnx.to_flat_state(nnx.state(model, (nnx.Param, RouterBias))))
  rules, entries = plan(cfg, leaves, fp8)
  shards = shard(entries, max_shard_bytes)
  tokenizer = _tokenizer_file(tokenizer_path)

  out.parent.mkdir(parents=True, exist_ok=True)
  # a hidden sibling (same file system, so the rename is atomic), made with the umask's mode
  tmp = out.parent / f'.{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}'
  tmp.mkdir()
  try:
    files = _write(tmp, cfg, fp8, rules, leaves, shards, tokenizer, progress)
    _check_out(out)  # nothing appeared there meanwhile
    if out.is_dir():
      out.rmdir()
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dict(out=str(out), files=files, tensors=len(entries),
              bytes=sum((out / f).stat().st_size for f in files))


def _write(directory: pathlib.Path, cfg: ModelConfig, fp8: bool, rules: list[hf.Rule],
           leaves: dict, shards: list[list[Entry]], tokenizer: pathlib.Path | None,
           progress: bool) -> list[str]:
  sources = _Sources(cfg, leaves, rules)
  names = [f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))]
  weight_map, total = {}, 0
  bar = tqdm.tqdm(total=sum(e.nbytes for s in shards for e in s), unit='B', unit_scale=True,
                  desc='save_pretrained', disable=not progress)
  for file_name, entries in zip(names, shards):
    bar.set_postfix_str(file_name)
    tensors = {}
    for r, group in itertools.groupby(entries, key=lambda e: e.rule):
      values = sources(r)
      for entry in group:
        tensors.update(_encode(entry, values[entry.source]))
    safetensors_io.write_file(directory / file_name, tensors, metadata={'format': 'pt'})
    weight_map.update({name: file_name for name in tensors})
    total += sum(t.nbytes for t in tensors.values())
    bar.update(sum(e.nbytes for e in entries))
    del tensors
  bar.close()
  index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
  (directory / safetensors_io.INDEX_FILE).write_text(json.dumps(index, indent=2) + '\n')
  (directory / 'config.json').write_text(json.dumps(hf_config(cfg, fp8), indent=2) + '\n')
  extra = _copy_tokenizer(tokenizer, directory) if tokenizer is not None else []
  return ['config.json', safetensors_io.INDEX_FILE, *names, *extra]

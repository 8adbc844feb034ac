"""A model and its tokenizer for inference, from a training workdir or a Hugging Face directory.

A workdir (`experiments.run --workdir=...`) holds `checkpoints/<step>/`
(`deepseek_jax/checkpoint.py`): `checkpoint.restore_model` reads the model config from its `meta`,
then only the parameters and router biases, not the optimizer state. Its tokenizer is the one
`data/tokenizer.make_tokenizer` made: `<workdir>/tokenizer.json` for 'bpe', else bytes.
A directory with `config.json` goes through `convert.hf.load_pretrained`.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import fp8
from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax import checkpoint as ckpt_lib
from deepseek_jax.data import tokenizer as tokenizer_lib


class Loaded(NamedTuple):
  cfg: ModelConfig
  model: model_lib.DeepSeekV3
  tokenizer: tokenizer_lib.Tokenizer
  source: str  # what was read, for the log line


def tokenizer_in(directory: pathlib.Path, cfg: ModelConfig) -> tokenizer_lib.Tokenizer:
  """`<directory>/tokenizer.json` when present, else bytes (which needs vocab_size >= 256)."""
  path = directory / tokenizer_lib.TOKENIZER_FILE
  if path.is_file():
    tokenizer = tokenizer_lib.load_file(str(path))  # DeepSeek's own included
  elif cfg.vocab_size >= tokenizer_lib.ByteTokenizer.vocab_size:
    tokenizer = tokenizer_lib.ByteTokenizer()
  else:
    raise FileNotFoundError(f'{path} not found, and vocab_size={cfg.vocab_size} is too small for '
                            'the byte tokenizer (256)')
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f'{path}: {tokenizer.vocab_size} tokens, more than the model\'s '
                     f'vocab_size={cfg.vocab_size}')
  return tokenizer


def restore_workdir(workdir: pathlib.Path, mesh: jax.sharding.Mesh | None = None, rules=None,
                    ) -> tuple[ModelConfig, model_lib.DeepSeekV3, str]:
  """The model of the latest checkpoint in `<workdir>/checkpoints` (`checkpoint.restore_model`):
  on the first device, or sharded over `mesh` by `rules`, each process reading its own blocks."""
  directory = (workdir / 'checkpoints').absolute()
  restored = ckpt_lib.restore_model(directory, mesh, rules)
  if restored is None:
    raise FileNotFoundError(
        f'no checkpoint in {directory} (train one with `python -m experiments.run '
        f'--workdir={workdir}`), and {workdir} is not a Hugging Face directory (no config.json)')
  return restored.cfg, restored.model, str(directory / str(restored.step))


def load(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None, rules=None,
         param_dtype=None, keep_fp8: bool = False, progress: bool = False) -> Loaded:
  """A workdir's latest checkpoint, or a Hugging Face `save_pretrained` directory (parameters
  in `param_dtype`, default float32, with a progress bar when `progress`), on one device or
  sharded over `mesh` by `rules`. `keep_fp8`: the weights precision='fp8' multiplies stay in
  E4M3 (`ModelConfig.fp8_weights`): a released FP8 checkpoint's own blocks, or a workdir's
  float32 weights quantized by `quantize_weights`."""
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory} does not exist or is not a directory (expected a '
                            'training workdir or a Hugging Face directory)')
  if (directory / 'config.json').is_file():
    from deepseek_jax.convert import hf  # pylint: disable=import-outside-toplevel
    cfg, model = hf.load_pretrained(directory, mesh=mesh, rules=rules,
                                    param_dtype=param_dtype or jnp.float32, keep_fp8=keep_fp8,
                                    progress=progress)
    source = str(directory.absolute())
  else:
    cfg, model, source = restore_workdir(directory, mesh, rules)
    if keep_fp8:
      model = quantize_weights(model)
      cfg = model.cfg
  return Loaded(cfg, model, tokenizer_in(directory, cfg), source)


def quantize_weights(model: model_lib.DeepSeekV3) -> model_lib.DeepSeekV3:
  """`model` with every weight that precision='fp8' multiplies kept in E4M3
  (`ModelConfig.fp8_weights`): scales amax / 448 per column of each 128-row block
  (`fp8.quantize_weight`). Each value keeps its weight's sharding; its scales are split as the
  weight's output dims are. Every other variable is shared with `model`."""
  cfg = model.cfg.replace(precision='fp8', fp8_weights=True)
  graphdef, state = nnx.split(model_lib.abstract(cfg))
  kept = dict(nnx.to_flat_state(state))
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    scale_path = path[:-1] + (f'{path[-1]}_scale',)
    if scale_path not in kept:
      out[path] = variable
      continue
    w, scale_shape = variable.get_value(), kept[scale_path].get_value().shape
    lead = next(i for i, (a, b) in enumerate(zip(w.shape, scale_shape)) if a != b)
    in_dims = w.ndim - len(scale_shape) + 1  # the contracted dims become one of blocks
    shardings = None
    if isinstance(w.sharding, jax.sharding.NamedSharding):
      spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
      scale_spec = spec[:lead] + (None,) + spec[lead + in_dims:]
      shardings = fp8.QuantizedWeight(w.sharding, w.sharding.update(spec=scale_spec))
    values, scales = jax.jit(fp8.quantize_weight, static_argnums=(1, 2),
                             out_shardings=shardings)(w, lead, in_dims)
    out[path] = kept[path].replace(values)
    out[scale_path] = kept[scale_path].replace(scales)
  return nnx.merge(graphdef, nnx.from_flat_state(out))

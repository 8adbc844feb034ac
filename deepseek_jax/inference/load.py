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
         param_dtype=None, progress: bool = False) -> Loaded:
  """A workdir's latest checkpoint, or a Hugging Face `save_pretrained` directory (parameters
  in `param_dtype`, default float32, with a progress bar when `progress`), on one device or
  sharded over `mesh` by `rules`."""
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory} does not exist or is not a directory (expected a '
                            'training workdir or a Hugging Face directory)')
  if (directory / 'config.json').is_file():
    from deepseek_jax.convert import hf  # pylint: disable=import-outside-toplevel
    cfg, model = hf.load_pretrained(directory, mesh=mesh, rules=rules,
                                    param_dtype=param_dtype or jnp.float32, progress=progress)
    source = str(directory.absolute())
  else:
    cfg, model, source = restore_workdir(directory, mesh, rules)
  return Loaded(cfg, model, tokenizer_in(directory, cfg), source)

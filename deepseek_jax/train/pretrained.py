"""Training from pretrained weights: `config.init_from` and the workdirs `experiments.convert`
writes.

`init_from` names a source: `hf:<dir>` (a Hugging Face `save_pretrained` directory, read by
`convert.hf.load_pretrained`) or a training workdir (its latest checkpoint's parameters and
router biases). A run whose workdir has no checkpoint yet starts from the source's weights with a
fresh optimizer at step 0; a workdir with a checkpoint resumes from it and ignores `init_from`
(a line says so). The meta of every checkpoint such a run writes records the source
(`meta['init_from']`), as does the step-0 checkpoint of `experiments.convert`.

The model config of a run that starts from, or resumes, pretrained weights is theirs: the
source's (config.json, or the workdir's meta) at the start, the latest checkpoint's on a resume.
It replaces the config file's `model` section field by field, one line listing what changed,
except the implementation switches (`config.IMPLEMENTATION_FIELDS`: how to compute, not what
the parameters are) and, at the start, `scan_layers` (the weights load into either layout; a
resume keeps its checkpoint's). A field the command line sets (`--config.model.<field>`) to
another value than the weights' is an error naming it: the weights cannot follow it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Collection
from typing import NamedTuple

import jax
from flax import nnx

from deepseek_jax import checkpoint as ckpt_lib
from deepseek_jax import model as model_lib
from deepseek_jax.config import IMPLEMENTATION_FIELDS, ModelConfig
from deepseek_jax.convert import hf as hf_lib
from deepseek_jax.convert import safetensors_io
from deepseek_jax.data.tokenizer import TOKENIZER_FILE
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.config import RunConfig

HF_PREFIX = 'hf:'


class Source(NamedTuple):
  """Pretrained weights to start from: a Hugging Face directory or a training workdir."""
  kind: str            # 'hf' or 'workdir'
  path: pathlib.Path   # absolute

  @property
  def spec(self) -> str:
    """As `init_from` writes it, with an absolute path (what the meta records)."""
    return f'{HF_PREFIX}{self.path}' if self.kind == 'hf' else str(self.path)

  @property
  def tokenizer(self) -> pathlib.Path | None:
    path = self.path / TOKENIZER_FILE
    return path if path.is_file() else None


def parse(init_from: str) -> Source | None:
  """The source `init_from` names ('' none); a ValueError naming it when it is neither a
  Hugging Face directory behind 'hf:' nor a workdir with a checkpoint."""
  if not init_from:
    return None
  if init_from.startswith(HF_PREFIX):
    path = pathlib.Path(init_from[len(HF_PREFIX):]).absolute()
    if not (path / 'config.json').is_file():
      raise ValueError(f'init_from={init_from!r}: {path / "config.json"} not found (hf:<dir> '
                       'names a Hugging Face save_pretrained directory)')
    return Source('hf', path)
  path = pathlib.Path(init_from).absolute()
  if latest_meta(path) is None:
    hint = (f'; it holds a config.json: did you mean {HF_PREFIX}{init_from}?'
            if (path / 'config.json').is_file() else '')
    raise ValueError(f'init_from={init_from!r} is neither hf:<Hugging Face dir> nor a training '
                     f'workdir with a checkpoint (none in {path / "checkpoints"}){hint}')
  return Source('workdir', path)


def latest_meta(workdir: pathlib.Path) -> tuple[int, dict] | None:
  """(step, meta) of a workdir's latest checkpoint, None without one; creates nothing."""
  return ckpt_lib.latest(pathlib.Path(workdir) / 'checkpoints')


def source_config(source: Source) -> ModelConfig:
  """The model config the source's weights were made with, read without reading the weights."""
  if source.kind == 'workdir':
    return ModelConfig.from_dict(latest_meta(source.path)[1]['model'])
  hf = json.loads((source.path / 'config.json').read_text())
  names = safetensors_io.Checkpoint(source.path).names()
  return hf_lib.config_from_hf(hf, mtp_depth=hf_lib.mtp_layers_in(names,
                                                                  hf['num_hidden_layers']))


def merge_model(run: ModelConfig, weights: ModelConfig, where: str, explicit: Collection[str],
                keep_layout: bool) -> tuple[ModelConfig, list[str]]:
  """`weights`' config with the run's implementation switches (and layout, if `keep_layout`),
  and a line listing the config file's values it replaced; a ValueError naming the fields the
  command line (`explicit`) sets otherwise."""
  kept = set(IMPLEMENTATION_FIELDS) | ({'scan_layers'} if keep_layout else set())
  mine, theirs = run.to_dict(), weights.to_dict()
  differ = [k for k in theirs if k not in kept and mine[k] != theirs[k]]
  asked = [k for k in differ if k in explicit]
  if asked:
    layout = (' (a checkpoint restores only into the layer layout that wrote it)'
              if 'scan_layers' in asked else '')
    raise ValueError(f'{where} fixes ' + ', '.join(f'model.{k}={theirs[k]!r}' for k in asked)
                     + '; the command line sets ' + ', '.join(f'{k}={mine[k]!r}' for k in asked)
                     + f': drop the override(s), the pretrained weights decide them{layout}')
  cfg = ModelConfig.from_dict({**theirs, **{k: mine[k] for k in kept}})
  changed = ', '.join(f'{k} {mine[k]!r} -> {theirs[k]!r}' for k in differ)
  return cfg, [f'model: from {where}' + (f", replacing the config's {changed}" if differ else '')]


class Start(NamedTuple):
  """How a run begins, from `plan`."""
  run: RunConfig                      # the model section is the weights' where they decide it
  origin: str | None                  # the pretrained source its weights began from (the meta's)
  source: Source | None               # initialise from it: a workdir without checkpoints
  tokenizer: pathlib.Path | None      # the source's tokenizer.json, to copy into the workdir
  notes: tuple[str, ...]              # lines to print


def plan(run: RunConfig, init_from: str, tokenizer_kind: str, workdir: pathlib.Path,
         explicit_model: Collection[str] = ()) -> Start:
  """Resume, start from `init_from`, or start fresh (module docstring); reads, writes nothing.
  `tokenizer_kind` is `data.tokenizer`: 'checkpoint' needs the source's tokenizer.json."""
  latest = latest_meta(workdir)
  if latest is not None:
    step, meta = latest
    where = pathlib.Path(workdir).absolute() / 'checkpoints' / str(step)
    notes = [f'init_from={init_from!r} ignored: resuming from {where} (init_from only starts a '
             'workdir without checkpoints)'] if init_from else []
    origin = meta.get('init_from')
    if origin is None:  # trained from scratch: the run's config must match it (checkpoint.py)
      return Start(run, None, None, None, tuple(notes))
    model, more = merge_model(run.model, ModelConfig.from_dict(meta['model']),
                              f'checkpoint {where}', explicit_model, keep_layout=False)
    return Start(dataclasses.replace(run, model=model), origin, None, None, tuple(notes + more))
  source = parse(init_from)
  if source is None:
    return Start(run, None, None, None, ())
  model, notes = merge_model(run.model, source_config(source), source.spec, explicit_model,
                             keep_layout=True)
  notes.append(f'init_from {source.spec}: pretrained weights, a fresh optimizer, step 0')
  tokenizer = source.tokenizer
  if tokenizer is None and tokenizer_kind == 'checkpoint':
    raise ValueError(f"data.tokenizer='checkpoint': init_from {source.spec} has no "
                     f'{TOKENIZER_FILE} (a workdir trained on bytes has none: use '
                     '--config.data.tokenizer=byte)')
  if tokenizer is None and tokenizer_kind == 'bpe':
    notes.append(f"init_from {source.spec} has no {TOKENIZER_FILE}: data.tokenizer='bpe' "
                 'trains a new one, whose ids the pretrained weights do not know')
  if tokenizer is not None and tokenizer_kind == 'byte':
    notes.append(f"data.tokenizer='byte': {tokenizer} is not used")
    tokenizer = None
  return Start(dataclasses.replace(run, model=model), source.spec, source, tokenizer,
               tuple(notes))


def copy_tokenizer(tokenizer: pathlib.Path, workdir: pathlib.Path) -> None:
  """The source's tokenizer.json as `<workdir>/tokenizer.json` (written whole, then renamed)."""
  target = pathlib.Path(workdir) / TOKENIZER_FILE
  tmp = target.with_suffix('.json.tmp')
  shutil.copyfile(tokenizer, tmp)
  tmp.replace(target)


def load_tree(source: Source, cfg: ModelConfig, mesh: jax.sharding.Mesh,
              table) -> dict[str, dict[tuple, jax.Array]]:
  """The source's parameters and router biases in `cfg`'s layout, each created on `mesh` with
  its sharding under `table`: {'params' | 'router_bias': {path: array}}."""
  if source.kind == 'hf':
    _, model = hf_lib.load_pretrained(source.path, mesh=mesh, rules=table,
                                      scan_layers=cfg.scan_layers,
                                      progress=jax.process_index() == 0)
    tree = model_lib.split_trainable(model)[1]
  else:
    restored = ckpt_lib.restore_model(source.path / 'checkpoints', mesh, table)
    saved = restored.cfg
    tree = model_lib.split_trainable(restored.model)[1]
  flat = {kind: {path: v.get_value() for path, v in nnx.to_flat_state(state)}
          for kind, state in tree.items()}
  if source.kind == 'workdir' and saved.scan_layers != cfg.scan_layers:
    flat = {kind: model_lib.relayout(values, saved) for kind, values in flat.items()}
  return flat


def initial_state(source: Source, cfg: ModelConfig, tx, abstract_state: dict, shardings: dict,
                  mesh: jax.sharding.Mesh, table) -> dict:
  """The train state {'tree', 'opt', 'step'} of the source's weights with `tx`'s fresh state
  at step 0, on `shardings` (`loop.train_state_layout`'s abstract state and shardings)."""
  values = load_tree(source, cfg, mesh, table)
  tree = {}
  for kind, state in abstract_state['tree'].items():
    flat = dict(nnx.to_flat_state(state))
    missing = sorted(set(flat) ^ set(values[kind]), key=str)
    if missing:  # the configs agree, so only a bug of ours gets here
      raise ValueError(f'init_from {source.spec}: {kind} paths differ from the model\'s: '
                       f'{missing[:4]}')
    tree[kind] = nnx.from_flat_state({path: v.replace(values[kind][path])
                                      for path, v in flat.items()})
  tree = jax.device_put(tree, shardings['tree'])
  return jax.jit(lambda tree: step_lib.init_state(tree, tx), donate_argnums=0,
                 out_shardings=shardings)(tree)


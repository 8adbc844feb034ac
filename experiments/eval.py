"""Held-out loss, bits per byte and tokens/s of a trained workdir or a Hugging Face directory.

  python -m experiments.eval --workdir=runs/tiny | --hf=DIR [--data.path=FILES] [--seq_len=512]
                             [--batch_size=8] [--max_batches=0] [--mesh=DATA,EXPERT,PLANE --fsdp]
                             [--keep_fp8]

Every document of `--data.path` (a file, a directory of *.txt or a glob; default the embedded
corpus's held-out split, the one `experiments.run` evaluates on) is tokenized with the model's own
tokenizer and cut into windows of `--seq_len` + 1 tokens, `--batch_size` windows per batch. The
weights are read straight onto the mesh (experts over expert x plane, every weight over data with
--fsdp) and each batch is split over its three axes. Prints one JSON line: eval_loss (nats per
token), eval_bpb, tokens, tokens_per_s (after compilation), compile_s, the checkpoint and mesh.
--keep_fp8 keeps the weights that precision='fp8' multiplies in E4M3 (a released FP8
checkpoint's own blocks; a workdir's weights quantized), and evaluates in FP8.
Several processes run the same command with `experiments/distributed.py`'s flags
(--coordinator_address, --num_processes, --process_id): each reads its own blocks of the weights
and its own rows of every batch; process 0 prints.
"""

import json
import sys
import time

from absl import app, flags, logging

from experiments import distributed

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (its latest checkpoint).')
_HF = flags.DEFINE_string('hf', None, 'Hugging Face save_pretrained directory.')
_DATA = flags.DEFINE_string('data.path', '', 'Text to evaluate on; default: the embedded '
                            "corpus's held-out split.")
_SEQ_LEN = flags.DEFINE_integer('seq_len', 512, 'Tokens per window.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Windows per batch (a multiple of the mesh).')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', 0, 'Evaluate at most this many; 0: all.')
_MESH = flags.DEFINE_list('mesh', ['1', '1', '1'], 'data,expert,plane (-1 for data: the '
                          'devices left).')
_FSDP = flags.DEFINE_bool('fsdp', False, 'Also split every weight over data.')
_KEEP_FP8 = flags.DEFINE_bool('keep_fp8', False, "Keep the FP8 weights in E4M3 and run "
                              "precision='fp8' (ModelConfig.fp8_weights).")


def documents(path: str):
  """The documents to evaluate: all of `path`'s, or the embedded corpus's held-out split."""
  from deepseek_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  docs = pipeline.load_documents(path)
  return docs if path else pipeline.split(docs, 0.05)[1]


def evaluate(source: str, data_path: str, seq_len: int, batch_size: int, max_batches: int,
             mesh_sizes, fsdp: bool, keep_fp8: bool = False) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from deepseek_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from deepseek_jax import sharding  # pylint: disable=import-outside-toplevel
  from deepseek_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from deepseek_jax.inference import load  # pylint: disable=import-outside-toplevel
  from deepseek_jax.train import loop, step  # pylint: disable=import-outside-toplevel

  try:
    data, expert, plane = (int(v) for v in mesh_sizes)
  except ValueError:
    raise ValueError(f'--mesh={",".join(mesh_sizes)}: expected three integer sizes '
                     'data,expert,plane') from None
  mesh = sharding.make_mesh(data, expert, plane)
  loaded = load.load(source, mesh=mesh, rules=sharding.rules(fsdp), keep_fp8=keep_fp8,
                     progress=True)
  if seq_len > loaded.cfg.max_position_embeddings:
    raise ValueError(f'--seq_len={seq_len} exceeds the model\'s max_position_embeddings='
                     f'{loaded.cfg.max_position_embeddings}')
  sharding.check_mesh(mesh, batch_size, loaded.cfg.n_routed_experts, loaded.cfg.n_group,
                      sharding.fsdp_dims(loaded.cfg) if fsdp else None)
  tokens = pipeline.tokenize_split(documents(data_path), loaded.tokenizer)
  batches = pipeline.eval_batches(tokens, seq_len, batch_size, max_batches or None,
                                  jax.process_index(), jax.process_count())
  graphdef, tree, rest = model_lib.split_trainable(loaded.model)
  rows = sharding.batch_sharding(mesh)
  eval_step = step.make_eval_step(graphdef, rest, jax.tree.map(lambda a: a.sharding, tree), rows)
  bytes_per_token = loop.replicated_bytes_per_token(loaded.tokenizer, mesh)
  with jax.set_mesh(mesh):  # the MoE dispatches over the ambient mesh
    placed = [sharding.put_batch(b, rows) for b in batches]
    start = time.perf_counter()
    loop.evaluate(eval_step, tree, placed[:1], bytes_per_token)  # compiles
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = loop.evaluate(eval_step, tree, placed, bytes_per_token)
    seconds = time.perf_counter() - start
  count = len(batches) * batch_size * seq_len
  return dict(metrics, tokens=count, tokens_per_s=count / seconds, compile_s=compile_s,
              eval_s=seconds, checkpoint=loaded.source, mesh=dict(mesh.shape), fsdp=fsdp,
              fp8_weights=loaded.cfg.fp8_weights)


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax warns about its read-only manager
  if (_WORKDIR.value is None) == (_HF.value is None):
    sys.exit('error: give exactly one of --workdir and --hf')
  distributed.initialize()
  import jax  # pylint: disable=import-outside-toplevel  (after jax.distributed)
  try:
    result = evaluate(_WORKDIR.value or _HF.value, _DATA.value, _SEQ_LEN.value, _BATCH.value,
                      _MAX_BATCHES.value, _MESH.value, _FSDP.value, _KEEP_FP8.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)

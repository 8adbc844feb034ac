"""Exports a trained workdir's latest checkpoint (or a Hugging Face directory) as a Hugging Face
DeepSeek-V3 directory that transformers, vLLM and SGLang load.

  python -m experiments.export --workdir=runs/tiny --out=runs/tiny-hf [--fp8] [--max_shard_gb=5]

Weights are BF16; `--fp8` writes the weights DeepSeek's release quantizes as E4M3 with 128x128
`weight_scale_inv` blocks. The workdir's `tokenizer.json` is copied when there is one. Prints one
line of JSON: out, files, bytes, tensors, seconds.
"""

import json
import pathlib
import sys
import time

from absl import app, flags, logging

from deepseek_jax.convert import export
from deepseek_jax.inference import load

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir or Hugging Face directory.',
                               required=True)
_OUT = flags.DEFINE_string('out', None, 'Directory to create (must not exist, or be empty).',
                           required=True)
_FP8 = flags.DEFINE_bool('fp8', False, 'E4M3 weights with 128x128 scales, as released.')
_MAX_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0, 'Tensor bytes per safetensors file, '
                                   'in GB (1e9).')


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax warns about its read-only manager
  start = time.perf_counter()
  try:
    loaded = load.load(_WORKDIR.value)
    tokenizer = pathlib.Path(_WORKDIR.value) / export.TOKENIZER_FILES[0]
    result = export.save_pretrained(
        loaded.model, _OUT.value, fp8=_FP8.value, max_shard_bytes=_MAX_SHARD_GB.value * 1e9,
        tokenizer_path=tokenizer if tokenizer.is_file() else None)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  if not tokenizer.is_file():
    print(f'note: no {tokenizer}; the byte tokenizer has no tokenizer.json, none written',
          file=sys.stderr)
  print(json.dumps(dict(result, seconds=round(time.perf_counter() - start, 2), fp8=_FP8.value,
                        checkpoint=loaded.source)))


if __name__ == '__main__':
  app.run(main)

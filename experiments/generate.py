"""Generates text from a trained workdir's latest checkpoint (or a Hugging Face directory).

  python -m experiments.generate --workdir=runs/tiny --prompt="The " --max_new_tokens=128
                                 [--speculative] [--temperature=0] [--top_k=0] [--top_p=1]
                                 [--mode=absorbed|naive] [--max_len=...] [--seed=0]
                                 [--mesh=DATA,EXPERT,PLANE [--fsdp]] [--keep_fp8]

Prints each prompt with its continuation, then one line of JSON: tokens_per_s, new_tokens,
acceptance_rate (null without --speculative), cache_bytes_per_token and the timings.
With --mesh the weights are read straight onto a (data, expert, plane) mesh of the visible
devices (experts over expert x plane as in training, every weight over data with --fsdp) and the
batch and its cache are split over all three axes; several processes run the same command with
`experiments/distributed.py`'s flags (process 0 prints). --keep_fp8 keeps the weights that
precision='fp8' multiplies in E4M3 (a released FP8 checkpoint's own blocks; a workdir's weights
quantized) and decodes in FP8.
"""

import json
import sys

from absl import app, flags, logging

from deepseek_jax import sharding
from deepseek_jax.inference import decode, load, sampling, speculative
from experiments import distributed

_WORKDIR = flags.DEFINE_string('workdir', 'runs/tiny',
                                'Training workdir or Hugging Face directory.')
_PROMPT = flags.DEFINE_multi_string('prompt', ['The '], 'Prompt text; repeat for a batch.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens generated after each prompt.')
_SPECULATIVE = flags.DEFINE_bool('speculative', False, 'Draft with the MTP module, verify with '
                                 'the main model.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens; 0: off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1: off.')
_MODE = flags.DEFINE_enum('mode', 'absorbed', ['absorbed', 'naive'],
                          'absorbed: latent cache with weight absorption; naive: per-head K/V.')
_MAX_LEN = flags.DEFINE_integer('max_len', None, 'Cache length (default: longest prompt + '
                                'max_new_tokens).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_MESH = flags.DEFINE_list('mesh', None, 'data,expert,plane: shard the weights over this mesh '
                          '(-1 for data: the devices left); default one device.')
_FSDP = flags.DEFINE_bool('fsdp', False, 'With --mesh, also split every weight over data.')
_KEEP_FP8 = flags.DEFINE_bool('keep_fp8', False, "Keep the FP8 weights in E4M3 and run "
                              "precision='fp8' (ModelConfig.fp8_weights).")


def mesh_from_flags():
  """(mesh, rules) from --mesh / --fsdp; (None, None) without --mesh."""
  if _MESH.value is None:
    return None, None
  if len(_MESH.value) != 3:
    raise ValueError(f'--mesh={",".join(_MESH.value)}: expected three sizes data,expert,plane')
  try:
    data, expert, plane = (int(v) for v in _MESH.value)
  except ValueError:
    raise ValueError(f'--mesh={",".join(_MESH.value)}: sizes must be integers') from None
  return sharding.make_mesh(data, expert, plane), sharding.rules(_FSDP.value)


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax warns about its read-only manager
  distributed.initialize()
  try:
    config = sampling.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    mesh, rules = mesh_from_flags()
    if mesh is not None and _SPECULATIVE.value:
      raise ValueError('--speculative runs on one device: drop --mesh')
    loaded = load.load(_WORKDIR.value, mesh=mesh, rules=rules, keep_fp8=_KEEP_FP8.value,
                       progress=True)
    prompts = [loaded.tokenizer.encode(text) for text in _PROMPT.value]
    options = dict(sampling=config, mode=_MODE.value, max_len=_MAX_LEN.value, seed=_SEED.value)
    if _SPECULATIVE.value:
      result = speculative.generate(loaded.model, prompts, _MAX_NEW.value, **options)
    else:
      result = decode.generate(loaded.model, prompts, _MAX_NEW.value, mesh=mesh, **options)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  import jax  # pylint: disable=import-outside-toplevel  (after jax.distributed)
  if jax.process_index():
    return
  for text, tokens in zip(_PROMPT.value, result.tokens):
    print(text + loaded.tokenizer.decode(tokens))
    print()
  print(json.dumps(dict(
      tokens_per_s=result.tokens_per_s, new_tokens=result.new_tokens,
      acceptance_rate=result.acceptance_rate,
      cache_bytes_per_token=result.cache_bytes_per_token,
      draft_cache_bytes_per_token=result.draft_cache_bytes_per_token,
      prefill_s=result.prefill_s, decode_s=result.decode_s, compile_s=result.compile_s,
      mode=_MODE.value, speculative=_SPECULATIVE.value, checkpoint=loaded.source,
      mesh=None if mesh is None else dict(mesh.shape))))


if __name__ == '__main__':
  app.run(main)

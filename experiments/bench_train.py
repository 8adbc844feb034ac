"""Training tokens/s and MFU of the tiny config and a larger CPU config, against transformers'
DeepseekV3ForCausalLM on the same configuration, batch and sequence length (when torch and
transformers are installed). Prints one JSON line per config.

  python -m experiments.bench_train [--steps=5] [--nohf]
"""

import importlib.util
import json

from absl import app, flags

from deepseek_jax import hostmem
from deepseek_jax.config import ModelConfig
from deepseek_jax.train.config import resolve
from experiments import train_bench as bench
from experiments.configs import tiny

_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per measurement (after one warm-up).')
_HF = flags.DEFINE_bool('hf', True, 'Also time transformers (needs torch and transformers).')

# Wider and deeper, with V3's fine-grained routing: 64 small experts in 8 groups, a token may use
# 4 groups and 8 experts (V3: 256 experts, 8 groups, 4 kept, top-8).
LARGER = dict(hidden_size=256, num_layers=6, num_heads=8, intermediate_size=768,
              moe_intermediate_size=64, q_lora_rank=128, kv_lora_rank=64, n_routed_experts=64,
              n_group=8, topk_group=4, num_experts_per_tok=8)


def main(argv):
  del argv
  config = tiny.get_config()
  train = resolve(config).train
  with_hf = _HF.value and all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))
  peak = bench.peak_matmul_flops()
  for name, overrides in (('tiny', {}), ('tiny_larger', LARGER)):
    cfg = ModelConfig.from_dict({**config.model.to_dict(), **overrides})
    row = bench.compare(name, cfg, train, train.batch_size, train.seq_len, _STEPS.value, peak,
                        with_hf)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  hostmem.reexec_with_huge_pages('experiments.bench_train')  # see deepseek_jax/hostmem.py
  app.run(main)

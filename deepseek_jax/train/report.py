"""End-of-run artefacts: a PNG of the loss curves and the expert-load heat map, and a text sample.

The sample is greedy and recomputes the whole window each token; one compiled function serves
every step. It deliberately does not use `deepseek_jax.inference`: being independent of the KV
cache, it is the reference a test holds the cached decoder of a restored checkpoint to.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import model as model_lib


def sample(model, tokenizer, prompt: str, num_tokens: int) -> str:
  """Greedy continuation of `prompt` by `num_tokens` tokens."""
  ids = [int(i) for i in tokenizer.encode(prompt)] or [0]
  length = len(ids) + num_tokens
  buffer = np.zeros((1, length), np.int32)
  buffer[0, :len(ids)] = ids
  graphdef, state = nnx.split(model)
  next_token = jax.jit(lambda state, tokens, i: jnp.argmax(
      model_lib.apply(graphdef, state, tokens).logits[0, i - 1]))
  for i in range(len(ids), length):  # causal: the zeros after position i-1 do not matter
    buffer[0, i] = int(next_token(state, buffer, i))
  return tokenizer.decode(buffer[0, len(ids):])


def plot(rows: list[dict], loads: list[tuple[int, np.ndarray]], path: pathlib.Path) -> None:
  """Loss curves (train, MTP, held-out) and load / mean load per (MoE layer, expert) over steps."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, (curves, heat) = plt.subplots(1, 2, figsize=(13, 4.5))
  for key, label in (('loss', 'train loss'), ('ce_loss', 'main CE'), ('mtp_loss', 'MTP CE'),
                     ('eval_loss', 'held-out CE')):
    points = [(r['step'], r[key]) for r in rows if key in r]
    if points:
      curves.plot(*zip(*points), label=label, marker='o' if key == 'eval_loss' else None)
  curves.set_xlabel('step')
  curves.set_ylabel('nats / token')
  curves.legend()
  curves.set_title('losses')
  if loads:
    steps = [s for s, _ in loads]
    stacked = np.stack([load / np.maximum(load.mean(axis=-1, keepdims=True), 1e-9)
                        for _, load in loads])  # [steps, L_moe, E]
    image = heat.imshow(stacked.reshape(len(steps), -1).T, aspect='auto', cmap='viridis',
                        extent=(steps[0], steps[-1], stacked.shape[1] * stacked.shape[2], 0))
    for layer in range(1, stacked.shape[1]):
      heat.axhline(layer * stacked.shape[2], color='white', linewidth=0.5)
    fig.colorbar(image, ax=heat, label='load / mean load')
    heat.set_xlabel('step')
    heat.set_ylabel('MoE layer x expert')
    heat.set_title('expert load per MoE layer')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

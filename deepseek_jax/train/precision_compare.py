"""FP8 against BF16 training (V3 report §3.3, Fig. 10): the same config, data and seed trained
twice, once per `model.precision`, and the final losses compared.

The report's bar is a relative loss error below 0.25% between the FP8 and the BF16 run.

Both runs keep AdamW's moments in BF16, which the FP8 recipe prescribes (`loop.train` forces it
under precision='fp8'), so the only difference between them is the precision of the GEMMs the
policy covers: the comparison measures FP8 GEMMs, not the optimizer's storage format.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from deepseek_jax.train import loop

PRECISIONS = ('bf16', 'fp8')


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains `config` under each precision in `<workdir>/<precision>` (resuming if interrupted)
  and returns the final train / held-out losses of both and their relative difference."""
  workdir = pathlib.Path(workdir)
  result: dict[str, Any] = {'steps': config.train.steps, 'bf16_moments': True}
  curves = {}
  for precision in PRECISIONS:
    run = ml_collections.ConfigDict(config.to_dict())
    run.model.precision = precision
    run.train.bf16_moments = True  # the FP8 recipe's moments, in both runs (module docstring)
    last = loop.train(run, workdir / precision)
    rows = [json.loads(line) for line in (workdir / precision / 'metrics.jsonl').open()]
    curves[precision] = rows
    train_rows = [r for r in rows if 'loss' in r]
    result[f'{precision}_train_loss'] = _mean_tail([r['ce_loss'] for r in train_rows])
    result[f'{precision}_eval_loss'] = last['eval_loss']
    result[f'{precision}_eval_bpb'] = last['eval_bpb']
  for key in ('train_loss', 'eval_loss'):
    bf16, fp8 = result[f'bf16_{key}'], result[f'fp8_{key}']
    result[f'rel_diff_{key}'] = (fp8 - bf16) / bf16
  plot(curves, workdir / 'fp8_vs_bf16.png')
  return result


def _mean_tail(values: list[float], fraction: float = 0.1) -> float:
  """Mean of the last `fraction` of the logged values: one batch's loss is too noisy to compare."""
  tail = values[-max(1, int(len(values) * fraction)):]
  return sum(tail) / len(tail)


def plot(curves: dict[str, list[dict]], path: pathlib.Path) -> None:
  # pylint: disable-next=import-outside-toplevel
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for precision, rows in curves.items():
    train = [r for r in rows if 'ce_loss' in r]
    evals = [r for r in rows if 'eval_loss' in r]
    line, = ax.plot([r['step'] for r in train], [r['ce_loss'] for r in train], alpha=0.5,
                    label=f'{precision} train')
    ax.plot([r['step'] for r in evals], [r['eval_loss'] for r in evals], 'o-',
            color=line.get_color(), label=f'{precision} held-out')
  ax.set(xlabel='step', ylabel='cross-entropy (nats/token)', title='FP8 vs BF16 training')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

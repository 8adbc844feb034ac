"""FP8 against BF16 training (V3 report §3.3, Fig. 10): the same config and data trained once
per `model.precision` for each of several seeds, and the final losses compared.

The report's bar is a relative loss error below 0.25% between the FP8 and the BF16 run. At the
size a CPU trains, two runs that differ in nothing but rounding already drift apart by about
that much (the README's control), so one pair of runs cannot tell an FP8 penalty from that
drift: the comparison is made between the means over seeds, and the per-seed differences give
its standard error.

Both runs keep AdamW's moments in BF16, which the FP8 recipe prescribes (`train.bf16_moments`
resolves to it under precision='fp8'; here it is set for the BF16 run too), so the only difference between them is the precision of the GEMMs the
policy covers: the comparison measures FP8 GEMMs, not the optimizer's storage format.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from typing import Any, Sequence

import ml_collections

from deepseek_jax.train import loop

PRECISIONS = ('bf16', 'fp8')
LOSSES = ('train_loss', 'eval_loss', 'eval_bpb')


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
            seeds: Sequence[int] | None = None) -> dict[str, Any]:
  """Trains `config` under each precision and seed in `<workdir>/seed<seed>/<precision>`
  (resuming whatever is there) and returns `summarize` of the final losses."""
  workdir = pathlib.Path(workdir)
  seeds = [config.seed] if seeds is None else list(seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds={seeds}: give one or more distinct seeds')
  per_seed, curves = [], {}
  for seed in seeds:
    row: dict[str, Any] = {'seed': seed}
    for precision in PRECISIONS:
      run = ml_collections.ConfigDict(config.to_dict())
      run.seed = seed
      run.model.precision = precision
      run.train.bf16_moments = True  # the FP8 recipe's moments, in both runs (module docstring)
      rundir = workdir / f'seed{seed}' / precision
      loop.train(run, rundir)
      rows = [json.loads(line) for line in (rundir / 'metrics.jsonl').read_text().splitlines()]
      curves[seed, precision] = rows
      row.update({f'{precision}_{k}': v for k, v in final_losses(rows, run.train.steps).items()})
    per_seed.append(row)
  plot(curves, workdir / 'fp8_vs_bf16.png')
  return {'steps': config.train.steps, 'bf16_moments': True, **summarize(per_seed)}


def final_losses(rows: list[dict], steps: int) -> dict[str, float]:
  """A run's final held-out loss and bits/byte (the eval at `steps`) and its training CE
  (the mean over the last 10% of logged steps: one batch's loss is too noisy to compare)."""
  evals = [r for r in rows if 'eval_loss' in r and r['step'] == steps]
  if not evals:
    raise ValueError(f'no held-out evaluation at step {steps} in metrics.jsonl')
  train = [r['ce_loss'] for r in rows if 'ce_loss' in r]
  tail = train[-max(1, len(train) // 10):]
  return {'train_loss': sum(tail) / len(tail), 'eval_loss': evals[-1]['eval_loss'],
          'eval_bpb': evals[-1]['eval_bpb']}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
  """The mean of each final loss over seeds per precision, the relative differences of those
  means, `(fp8 - bf16) / bf16`, and with two or more seeds the standard error of the held-out
  difference (the spread of the per-seed differences over sqrt(seeds)). Each per-seed row gets
  its own relative differences too (in copies; the caller's rows are left as they are)."""
  per_seed = [dict(row, **{f'rel_diff_{key}': (row[f'fp8_{key}'] - row[f'bf16_{key}'])
                           / row[f'bf16_{key}'] for key in ('train_loss', 'eval_loss')})
              for row in per_seed]
  result: dict[str, Any] = {'seeds': [row['seed'] for row in per_seed]}
  for precision in PRECISIONS:
    for key in LOSSES:
      result[f'{precision}_{key}'] = statistics.fmean(row[f'{precision}_{key}'] for row in per_seed)
  for key in ('train_loss', 'eval_loss'):
    bf16, fp8 = result[f'bf16_{key}'], result[f'fp8_{key}']
    result[f'rel_diff_{key}'] = (fp8 - bf16) / bf16
  if len(per_seed) > 1:
    diffs = [row['rel_diff_eval_loss'] for row in per_seed]
    result['rel_diff_eval_loss_stderr'] = statistics.stdev(diffs) / math.sqrt(len(diffs))
  result['per_seed'] = per_seed
  return result


def plot(curves: dict[tuple[int, str], list[dict]], path: pathlib.Path) -> None:
  """Left: training CE and held-out loss of every run. Right: the held-out relative difference
  FP8 - BF16 along training, per seed, with the report's ±0.25% band."""
  # pylint: disable-next=import-outside-toplevel
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(12, 4))
  colors = {'bf16': 'tab:blue', 'fp8': 'tab:orange'}
  seeds = sorted({seed for seed, _ in curves})
  for (seed, precision), rows in curves.items():
    first = seed == seeds[0]
    train = [r for r in rows if 'ce_loss' in r]
    evals = [r for r in rows if 'eval_loss' in r]
    ax.plot([r['step'] for r in train], [r['ce_loss'] for r in train], alpha=0.3,
            color=colors[precision], label=f'{precision} train' if first else None)
    ax.plot([r['step'] for r in evals], [r['eval_loss'] for r in evals], 'o-', ms=3,
            color=colors[precision], label=f'{precision} held-out' if first else None)
  for seed in seeds:
    evals = {p: {r['step']: r['eval_loss'] for r in curves[seed, p] if 'eval_loss' in r}
             for p in PRECISIONS}
    steps = sorted(set(evals['bf16']) & set(evals['fp8']))
    ax_diff.plot(steps, [100 * (evals['fp8'][s] / evals['bf16'][s] - 1) for s in steps], 'o-',
                 ms=3, label=f'seed {seed}')
  ax_diff.axhspan(-0.25, 0.25, color='0.9', label='±0.25% (V3 §3.3)')
  ax_diff.axhline(0.0, color='0.5', lw=0.8)
  ax.set(xlabel='step', ylabel='cross-entropy (nats/token)', title='FP8 vs BF16 training')
  ax_diff.set(xlabel='step', ylabel='held-out loss, FP8 vs BF16 (%)',
              title='relative difference per seed')
  ax.legend()
  ax_diff.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

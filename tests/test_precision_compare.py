"""`experiments.fp8_vs_bf16`'s comparison: per seed one BF16 and one FP8 run of the same config,
final losses read back from each run's metrics.jsonl, means over seeds and their relative
difference with a standard error checked against numpy."""

import json
import pathlib

import numpy as np
import pytest

from experiments import precision_compare
from tests.test_train_loop import small_config


def test_summarize_against_numpy():
  rng = np.random.default_rng(0)
  losses = rng.uniform(3.0, 4.0, size=(3, 2, 3))  # seed, precision, (train, eval, bpb)
  rows = [{'seed': s, **{f'{p}_{k}': float(losses[s, i, j])
                         for i, p in enumerate(('bf16', 'fp8'))
                         for j, k in enumerate(('train_loss', 'eval_loss', 'eval_bpb'))}}
          for s in range(3)]
  result = precision_compare.summarize(rows)
  mean = losses.mean(axis=0)
  assert result['seeds'] == [0, 1, 2]
  np.testing.assert_allclose(result['bf16_eval_loss'], mean[0, 1], rtol=1e-12)
  np.testing.assert_allclose(result['fp8_eval_bpb'], mean[1, 2], rtol=1e-12)
  np.testing.assert_allclose(result['rel_diff_eval_loss'], mean[1, 1] / mean[0, 1] - 1, rtol=1e-12)
  np.testing.assert_allclose(result['rel_diff_train_loss'], mean[1, 0] / mean[0, 0] - 1,
                             rtol=1e-12)
  per_seed = losses[:, 1, 1] / losses[:, 0, 1] - 1
  np.testing.assert_allclose([r['rel_diff_eval_loss'] for r in result['per_seed']], per_seed,
                             rtol=1e-12)
  np.testing.assert_allclose(result['rel_diff_eval_loss_stderr'],
                             per_seed.std(ddof=1) / np.sqrt(3), rtol=1e-12)
  assert 'rel_diff_eval_loss_stderr' not in precision_compare.summarize(rows[:1])


def test_compare_runs_each_seed_under_both_precisions_and_reads_back_their_metrics(
    tmp_path, monkeypatch):
  """The orchestration, with loop.train (tested in test_train_loop.py) replaced by a stand-in
  that records the config it gets and writes a metrics.jsonl whose losses depend on it."""
  calls = []

  def fake_train(config, workdir):
    calls.append((config.seed, config.model.precision, config.train.bf16_moments,
                  config.train.steps, pathlib.Path(workdir).relative_to(tmp_path).as_posix()))
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    offset = config.seed + (0.01 if config.model.precision == 'fp8' else 0.0)
    rows = [{'step': s, 'loss': 9.0, 'ce_loss': 3.0 + offset + s} for s in range(1, 21)]
    rows += [{'step': 10, 'eval_loss': 99.0, 'eval_bpb': 99.0},
             {'step': 20, 'eval_loss': 4.0 + offset, 'eval_bpb': 2.0 + offset}]
    (pathlib.Path(workdir) / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n'
                                                                 for r in rows))

  monkeypatch.setattr(precision_compare.loop, 'train', fake_train)
  config = small_config(steps=20)
  result = precision_compare.compare(config, tmp_path, seeds=(0, 2))
  assert calls == [(0, 'bf16', True, 20, 'seed0/bf16'), (0, 'fp8', True, 20, 'seed0/fp8'),
                   (2, 'bf16', True, 20, 'seed2/bf16'), (2, 'fp8', True, 20, 'seed2/fp8')]
  assert config.model.precision == 'bf16' and config.seed == 0  # the caller's config untouched
  assert result['seeds'] == [0, 2] and result['steps'] == 20
  assert result['bf16_eval_loss'] == pytest.approx(5.0)  # (4 + 6) / 2: the eval at step 20
  assert result['rel_diff_eval_loss'] == pytest.approx(0.01 / 5.0)
  # training CE: the mean of the last 10% of logged steps, 19 and 20
  assert result['per_seed'][1]['fp8_train_loss'] == pytest.approx(2.01 + 3 + 19.5)
  assert result['per_seed'][1]['rel_diff_eval_loss'] == pytest.approx(0.01 / 6.0)
  assert (tmp_path / 'fp8_vs_bf16.png').stat().st_size > 0


def test_a_run_without_its_final_eval_is_named():
  with pytest.raises(ValueError, match='step 20'):
    precision_compare.final_losses([{'step': 10, 'eval_loss': 1.0, 'eval_bpb': 1.0}], 20)

"""The training loop end to end on a very small model: resume after kill -9 reproduces the
uninterrupted run's losses exactly, SIGTERM leaves a restorable checkpoint, a resume may change
the implementation switches but not what the parameters depend on, `--config.train.steps=10`
alone runs the tiny schedule fitted to 10 steps, bad inputs fail with messages that name the path
and the mismatch, and the workdir holds the promised outputs."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from deepseek_jax import checkpoint as ckpt_lib
from deepseek_jax.train import loop
from deepseek_jax.train import optimizer as opt_lib
from deepseek_jax.train.config import TrainConfig
from experiments.configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, qk_nope_head_dim=8,
                   qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=16, kv_lora_rank=12,
                   intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                   num_experts_per_tok=2, n_group=4, topk_group=2)
SMALL_TRAIN = dict(batch_size=4, seq_len=32, warmup_steps=1, log_every=1, eval_every=1000,
                   checkpoint_every=3, eval_batches=1, sample_tokens=4)
LOSS_KEYS = ('loss', 'ce_loss', 'mtp_loss', 'bal_loss', 'max_vio', 'grad_norm', 'lr')

CONFIG_FILE = f'''
from experiments.configs import tiny

def get_config():
  config = tiny.get_config()
  config.model.update({SMALL_MODEL!r})
  config.train.update({SMALL_TRAIN!r})
  config.data.tokenizer = 'byte'
  config.train.steps = STEPS
  config.mesh.data = 1  # one device (tests/test_sharding.py covers meshes)
  return config
'''


def small_config(steps: int):
  config = tiny.get_config()
  config.model.update(SMALL_MODEL)
  config.train.update(SMALL_TRAIN)
  config.data.tokenizer = 'byte'
  config.train.steps = steps
  config.mesh.data = 1  # one device (tests/test_sharding.py covers meshes)
  return config


def config_file(tmp_path: pathlib.Path, steps: int) -> pathlib.Path:
  path = tmp_path / f'small_{steps}.py'
  path.write_text(CONFIG_FILE.replace('STEPS', str(steps)))
  return path


def start_run(config: pathlib.Path, workdir: pathlib.Path, *flags: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, '-m', 'experiments.run', f'--config={config}',
                           f'--workdir={workdir}', *flags], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_rows(workdir: pathlib.Path) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {row['step']: {k: row[k] for k in LOSS_KEYS} for row in rows if 'loss' in row}


def committed_steps(workdir: pathlib.Path) -> list[int]:
  directory = workdir / 'checkpoints'
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0):
  deadline = time.time() + timeout
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f'run ended early:\n{process.stdout.read()}')
    if time.time() > deadline:
      process.kill()
      raise AssertionError('timed out waiting for the run')
    time.sleep(0.05)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 12-step run, in this process."""
  workdir = tmp_path_factory.mktemp('reference')
  result = loop.train(small_config(12), workdir)
  return workdir, result


def test_workdir_outputs(reference):
  workdir, result = reference
  rows = train_rows(workdir)
  assert sorted(rows) == list(range(1, 13))
  assert committed_steps(workdir) == [6, 9, 12]  # keep_checkpoints=3 of 3, 6, 9, 12
  assert (workdir / 'training.png').stat().st_size > 10_000
  assert list((workdir / 'tensorboard').iterdir())
  assert len((workdir / 'sample.txt').read_text(errors='replace')) > 0
  assert 0 < result['eval_bpb'] < 9 and result['step'] == 12
  loads = [json.loads(line) for line in (workdir / 'expert_load.jsonl').read_text().splitlines()]
  # one row per MoE layer (1 main + 1 MTP block), each summing to batch * seq_len * K
  assert all(sum(map(sum, row['load'])) == 2 * 4 * 32 * 2 for row in loads)
  assert rows[12]['loss'] < rows[1]['loss']


@pytest.mark.slow
def test_resume_after_kill_9_reproduces_losses(reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  config = config_file(tmp_path, 12)
  process = start_run(config, workdir)
  wait_for(lambda: committed_steps(workdir), process)
  process.send_signal(signal.SIGKILL)  # kill -9: no handler, no final save
  process.wait()
  killed_at = committed_steps(workdir)
  assert killed_at and killed_at[-1] < 12, (killed_at, 'the run finished before the kill')
  resumed = start_run(config, workdir)
  output, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, output
  assert f'resumed from {workdir / "checkpoints" / str(killed_at[-1])}' in output
  assert train_rows(workdir) == train_rows(ref_dir)  # every step, exactly


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  process = start_run(config_file(tmp_path, 10_000), workdir)
  wait_for(lambda: (workdir / 'metrics.jsonl').exists()
           and len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 2, process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  saved = committed_steps(workdir)
  assert saved and 'SIGTERM: saved step' in output
  resumed = start_run(config_file(tmp_path, saved[-1] + 2), workdir)
  output, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, output
  assert f'resumed from {workdir / "checkpoints" / str(saved[-1])}' in output
  assert max(train_rows(workdir)) == saved[-1] + 2


def test_checkpoint_of_another_model_config_is_refused(reference, tmp_path):
  workdir, _ = reference
  config = small_config(14)
  config.model.n_routed_experts = 4
  config.model.n_group = 2
  config.model.topk_group = 1
  config.model.moe_matmul = 'ragged_dot'  # an implementation switch: allowed, not named
  before = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  with pytest.raises(ValueError, match=r'checkpoints/12 was written by a different model config.*'
                                       r'n_routed_experts: checkpoint 8, config 4') as info:
    loop.train(config, workdir)
  assert 'moe_matmul' not in str(info.value)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == before  # nothing deleted


def test_checkpoint_of_the_other_layer_layout_is_refused_naming_scan_layers(reference):
  """The reference run (tiny: one module per layer) continued with stacked layers: the
  parameter trees differ, and the error says which field and how to go on."""
  workdir, _ = reference
  config = small_config(14)
  assert not config.model.scan_layers
  config.model.scan_layers = True
  with pytest.raises(ValueError, match=r'model\.scan_layers: checkpoint False, config True.*'
                                       r'--config\.model\.scan_layers=False'):
    loop.train(config, workdir)


def test_resume_with_other_kernel_switches_continues_from_the_checkpoint(reference, tmp_path,
                                                                        capsys):
  ref_dir, _ = reference
  workdir = tmp_path / 'switched'
  shutil.copytree(ref_dir, workdir)
  config = small_config(13)
  config.model.update(moe_matmul='ragged_dot', mla_decode_kernel='xla', fp8_matmul_kernel='xla')
  result = loop.train(config, workdir)
  assert f'resumed from {workdir / "checkpoints" / "12"}' in capsys.readouterr().out
  assert result['step'] == 13
  rows = train_rows(workdir)
  assert sorted(rows) == list(range(1, 14))
  assert {s: rows[s] for s in range(1, 13)} == train_rows(ref_dir)  # history kept as it was
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', read_only=True)
  assert checkpoints.latest_step() == 13
  assert checkpoints.read_meta(13)['model']['moe_matmul'] == 'ragged_dot'  # the new run's config
  checkpoints.close()


TINY_SCHEDULE_FILE = f'''
from experiments.configs import tiny

def get_config():
  config = tiny.get_config()  # tiny's schedule: warm-up 40, gamma switch at 360, log every 10
  config.model.update({SMALL_MODEL!r})
  config.train.update(batch_size=4, seq_len=32, eval_batches=1, sample_tokens=4)
  config.data.tokenizer = 'byte'
  config.mesh.data = 1
  return config
'''


@pytest.mark.slow
def test_one_steps_override_runs_the_schedule_fitted_to_it(tmp_path):
  """`python -m experiments.run --config.train.steps=10`: the warm-up 40 becomes 1 and says so."""
  config = tmp_path / 'tiny_schedule.py'
  config.write_text(TINY_SCHEDULE_FILE)
  workdir = tmp_path / 'run'
  process = start_run(config, workdir, '--config.train.steps=10')
  output, _ = process.communicate(timeout=240)
  assert process.returncode == 0, output
  assert 'train.warmup_steps: 40 -> 1 (must be below steps=10: 10% of the run)' in output
  assert 'train.bias_gamma_switch_step=360 is not reached in steps=10' in output
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train] == [10]  # log_every 10
  assert [r['step'] for r in rows if 'eval_loss' in r] == [10]
  schedule = opt_lib.learning_rate_schedule(TrainConfig(steps=10, warmup_steps=1,
                                                        learning_rate=4e-3))
  assert train[0]['lr'] == pytest.approx(float(schedule(9)), rel=1e-6)
  assert committed_steps(workdir) == [10]


def test_an_explicit_value_that_does_not_fit_is_named(tmp_path):
  config = tmp_path / 'tiny_schedule.py'
  config.write_text(TINY_SCHEDULE_FILE)
  process = start_run(config, tmp_path / 'run', '--config.train.steps=10',
                      '--config.train.warmup_steps=40')
  output, _ = process.communicate(timeout=120)
  assert process.returncode != 0
  assert 'TrainConfig.warmup_steps=40: must lie in [0, steps=10)' in output
  assert not (tmp_path / 'run').exists()  # refused before anything is written


def test_corrupt_checkpoint_names_the_path(reference, tmp_path):
  workdir = tmp_path / 'corrupt'
  loop.train(small_config(3), workdir)
  meta = next((workdir / 'checkpoints' / '3' / 'meta').glob('*'))
  meta.write_text('{not json')
  with pytest.raises(ValueError, match=r'checkpoint .*checkpoints/3 cannot be'):
    loop.train(small_config(5), workdir)
  assert meta.exists()


@pytest.mark.parametrize('path', ['/nonexistent/corpus.txt', 'EMPTY'])
def test_missing_or_empty_data_path_names_it(tmp_path, path):
  if path == 'EMPTY':
    (tmp_path / 'empty.txt').write_text('')
    path = str(tmp_path / 'empty.txt')
  config = small_config(3)
  config.data.path = path
  with pytest.raises(ValueError, match=path.replace('.', r'\.')):
    loop.train(config, tmp_path / 'run')

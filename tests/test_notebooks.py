"""The notebooks in notebooks/: committed without outputs, and run end to end in smoke mode.

Each notebook's last cell asserts its figures and prints them after `FIGURES ` as JSON; running a
notebook fails when any cell raises, and the test checks the key figures once more here. The
kernel starts in notebooks/ with DEEPSEEK_JAX_SMOKE=1, the repository first on PYTHONPATH (so the
install cell finds the package and installs nothing) and otherwise this process's environment
(conftest.py's 8 virtual CPU devices, CPU platform and compilation cache).
"""

import json
import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / 'notebooks'
# Run in this order: moe_balance.ipynb trains the quickstart's smoke config again, so the
# persistent compilation cache serves its first run.
NAMES = ('quickstart.ipynb', 'mla_kv_cache.ipynb', 'moe_balance.ipynb')
CELL_TIMEOUT_S = 300
SMOKE_VARIABLE = 'DEEPSEEK_JAX_SMOKE'


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_every_notebook_is_tested():
  assert sorted(path.name for path in NOTEBOOKS.glob('*.ipynb')) == sorted(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_committed_without_outputs(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  dirty = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == 'code'
           and (cell.get('outputs') or cell.get('execution_count') is not None)]
  assert not dirty, (f'{name}: code cells {dirty} hold outputs or execution counts; clear them '
                     f'before committing (jupyter nbconvert --clear-output --inplace '
                     f'notebooks/{name})')


@pytest.mark.parametrize('name', NAMES)
def test_reads_the_smoke_variable_and_ends_with_checks(name):
  cells = [cell.source for cell in _read(name).cells if cell.cell_type == 'code']
  assert SMOKE_VARIABLE in cells[0], f'{name}: the first code cell must read {SMOKE_VARIABLE}'
  assert 'assert ' in cells[-1] and "print('FIGURES'" in cells[-1], (
      f'{name}: the last code cell must print FIGURES and assert them')


def _check_quickstart(figures):
  trained, restored = figures['trained_eval_loss'], figures['restored_eval_loss']
  assert abs(restored - trained) <= 1e-5 * abs(trained), figures
  assert figures['speculative_equals_plain'], figures
  assert 0.0 <= figures['acceptance_rate'] <= 1.0, figures
  assert figures['last_loss'] < figures['first_loss'], figures


def _check_mla_kv_cache(figures):
  assert figures['v3_mla_bytes_per_token'] == 70_272, figures  # ISCA'25 Table 1: 70.272 KB
  assert figures['v3_mha_bytes_per_token'] == 61 * 128 * (192 + 128) * 2, figures
  assert max(figures['decode_relative_differences'].values()) < 1e-5, figures
  assert figures['same_greedy_tokens'], figures
  assert figures['small_cache_bytes_measured'] == figures['small_cache_bytes_formula'], figures


def _check_moe_balance(figures):
  vio = figures['final_max_vio']
  assert vio['aux-loss-free'] < vio['no balancing'], figures
  assert figures['bias_replay_error'] <= 1e-6, figures
  assert figures['max_nodes_per_token']['group-limited'] <= 2, figures  # tiny.py: topk_group 2
  assert (figures['mean_nodes_per_token']['group-limited']
          <= figures['mean_nodes_per_token']['not limited']), figures


CHECKS = {'quickstart.ipynb': _check_quickstart, 'mla_kv_cache.ipynb': _check_mla_kv_cache,
          'moe_balance.ipynb': _check_moe_balance}


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_runs_in_smoke_mode(name, tmp_path):
  notebook = _read(name)
  env = dict(os.environ, **{SMOKE_VARIABLE: '1'})
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
  env['TMPDIR'] = str(tmp_path)  # the notebooks' workdirs (tempfile.mkdtemp) are cleaned up
  env['JAX_NUMPY_RANK_PROMOTION'] = 'raise'  # as strict as the rest of the suite
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOKS)}})
  try:
    client.execute(env=env)
  finally:
    nbformat.write(notebook, str(tmp_path / name))  # the executed notebook, to read on failure
  last = next(cell for cell in reversed(notebook.cells) if cell.cell_type == 'code')
  text = ''.join(out.get('text', '') for out in last.outputs if out.output_type == 'stream')
  assert 'all checks passed' in text, text
  figures = json.loads(text.split('FIGURES ', 1)[1].splitlines()[0])
  CHECKS[name](figures)

"""`python -m experiments.bench_kernels` on CPU: the interpret-mode smoke run the README names
writes every row, and in each the Pallas path agrees with the XLA path it is timed against."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_kernels_smoke_run_on_cpu(tmp_path):
  out = tmp_path / 'bench.jsonl'
  subprocess.run([sys.executable, '-m', 'experiments.bench_kernels', '--repeats=1',
                  f'--out={out}'], cwd=ROOT, check=True, capture_output=True, timeout=600)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  mla = [r for r in rows if r['kernel'] == 'mla_decode']
  gemm = [r for r in rows if r['kernel'] == 'fp8_matmul']
  assert sorted((r['Tq'], r['path']) for r in mla) == [(1, 'pallas'), (1, 'xla'), (2, 'pallas'),
                                                       (2, 'xla')]
  assert len(gemm) == 8 and all(r['interpret'] and r['us'] > 0 for r in rows)
  for r in mla:  # BF16 outputs of the two paths
    assert r['max_rel_diff_vs_xla'] <= 2e-2
  for r in gemm:
    if r['path'] == 'pallas':  # the same block-scaled sum, up to FP32 summation order
      assert r['max_rel_diff_vs_xla_block_scaled'] <= 1e-2  # both rounded to BF16 at the end
    assert r['max_rel_diff_vs_float32'] <= 0.08  # E4M3 inputs (or BF16) vs the FP32 product

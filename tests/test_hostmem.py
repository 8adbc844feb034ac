"""The huge-page re-exec of the training entry point (deepseek_jax/hostmem.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = '''
import os, sys
from deepseek_jax import hostmem
print('before', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
hostmem.reexec_with_huge_pages('hostmem_probe')
print('after', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], 'jax' in sys.modules)
'''


def _run(tmp_path, env_tunables):
  (tmp_path / 'hostmem_probe.py').write_text(PROBE)
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), str(tmp_path)])
  if env_tunables is not None:
    env['GLIBC_TUNABLES'] = env_tunables
  done = subprocess.run([sys.executable, '-m', 'hostmem_probe', '--flag=1', 'x'], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=60, check=True)
  return done.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc tunables are Linux-only')
def test_reexec_sets_the_tunable_once_and_keeps_the_arguments(tmp_path):
  lines = _run(tmp_path, None)
  # The first process stops at the exec; the second starts with the tunable and the same args.
  assert lines == ["before None ['--flag=1', 'x']",
                   "before glibc.malloc.hugetlb=1 ['--flag=1', 'x']",
                   "after glibc.malloc.hugetlb=1 ['--flag=1', 'x'] False"]


def test_an_existing_setting_is_left_alone(tmp_path):
  lines = _run(tmp_path, '')  # the documented opt-out
  assert lines == ["before  ['--flag=1', 'x']", "after  ['--flag=1', 'x'] False"]

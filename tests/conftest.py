"""Test setup: 8 virtual CPU devices (before JAX is imported) and strict rank promotion."""

import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiled programs cached on disk (keyed by the program, flags and versions, so never stale): the
# suite compiles the same small models' steps many times, in-process and in the subprocesses of
# the end-to-end tests, which inherit these variables.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(
    pathlib.Path(__file__).resolve().parents[1] / '.pytest_cache' / 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(name='tiny_config')
def tiny_config_fixture():
  """`tiny_config(**overrides) -> ModelConfig`: the tests' one tiny config (tests/tiny.py)."""
  return tiny.tiny_config

"""Fixtures shared by the test modules that run the command line in subprocesses."""

import os

import pytest


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A TFDS data dir per test module: its datasets are built once, by its first run."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment: a compilation cache shared by the runs saves seconds each."""
  return {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}

"""Fixtures shared by the test modules that run the command line in subprocesses."""

import os
import tempfile

import pytest


@pytest.fixture(scope='session', autouse=True)
def temp_dir_under_pytests(tmp_path_factory):
  """The tests' and their subprocesses' temporary files go under pytest's own base dir, which
  pytest prunes: TFDS leaves an empty dir in the temp dir for each builder it makes
  (DatasetInfo.initialize_from_bucket), about 160 in one run of the suite."""
  path = str(tmp_path_factory.mktemp('tmp'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('TMPDIR', path)
    patch.setattr(tempfile, 'tempdir', path)
    yield


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


def _tensorboard_steps(run_dir: str) -> dict[str, list[int]]:
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(run_dir)
  accumulator.Reload()
  return {tag: [event.step for event in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()['scalars']}


@pytest.fixture(scope='session')
def tensorboard_steps():
  """run dir -> {tag: logged steps}, read by TensorBoard's own event reader."""
  return _tensorboard_steps

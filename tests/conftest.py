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


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the whole run, both xdist workers and every
  subprocess included: most of the suite's time is compiling, and many tests compile the
  same smoke-config steps. Entries are keyed by the program and the XLA flags (8 fake
  devices compile apart), so a hit is the program a test would have compiled."""
  import jax  # noqa: PLC0415 (after pytest has set up: the tests configure JAX themselves)
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):  # the workers' base dirs share a parent
    root = root.parent
  path = str(root / 'jax_cache')
  settings = {'jax_compilation_cache_dir': path,
              'jax_persistent_cache_min_compile_time_secs': 0,
              'jax_persistent_cache_min_entry_size_bytes': 0}
  with pytest.MonkeyPatch.context() as patch:
    for name, value in settings.items():
      patch.setenv(name.upper(), str(value))  # subprocesses
      jax.config.update(name, value)  # this process
    yield


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A TFDS data dir per test module: its datasets are built once, by its first run."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def env():
  """Subprocess environment (with the shared compilation cache)."""
  return dict(os.environ)


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

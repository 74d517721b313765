"""Fixtures shared by the test modules that run the command line in subprocesses."""

import dataclasses
import fcntl
import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _shared_root(tmp_path_factory):
  """A directory both xdist workers see: their base dirs share a parent."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the whole run, both xdist workers and every
  subprocess included: most of the suite's time is compiling, and many tests compile the
  same smoke-config steps. Entries are keyed by the program and the XLA flags (8 fake
  devices compile apart), so a hit is the program a test would have compiled."""
  import jax  # noqa: PLC0415 (after pytest has set up: the tests configure JAX themselves)
  path = str(_shared_root(tmp_path_factory) / 'jax_cache')
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


@dataclasses.dataclass(frozen=True)
class SmokeRun:
  workdir: str   # read-only: a test that runs on it copies it first
  data_dir: str  # its TFDS data dir, built by the run
  stdout: str
  stderr: str


# Every stage of the split smoke config, evaluation during fine-tuning, and a detector of the
# fine-tuned model with two scorers and two thresholds: what the CLI, detector and export
# tests read.
SMOKE_ARGS = ('--config=configs/digits.py:split,smoke', '--config.finetune.eval_every=2',
              '--config.logit_ft.eval_every=4', '--config.evaluate.detector.model=finetune',
              '--config.evaluate.detector.scorers=mahalanobis_mood,msp',
              '--config.evaluate.detector.tprs=(0.95,0.8)')


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory, shared_compilation_cache) -> SmokeRun:
  """One finished `python -m mood_jax.main` run of SMOKE_ARGS for the whole test run, made by
  whichever xdist worker asks first (the other waits on the lock and reads it)."""
  root = _shared_root(tmp_path_factory) / 'smoke_run'
  root.mkdir(exist_ok=True)
  with open(root / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / 'done').exists():
      proc = subprocess.run(
          [sys.executable, '-m', 'mood_jax.main', *SMOKE_ARGS, f'--workdir={root / "workdir"}',
           f'--config.data.data_dir={root / "tfds"}'],
          cwd=REPO, capture_output=True, text=True, timeout=900)
      assert proc.returncode == 0, proc.stderr[-3000:]
      (root / 'stdout').write_text(proc.stdout)
      (root / 'stderr').write_text(proc.stderr)
      (root / 'done').touch()
  return SmokeRun(str(root / 'workdir'), str(root / 'tfds'), (root / 'stdout').read_text(),
                  (root / 'stderr').read_text())

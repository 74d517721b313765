"""One preparation of a TFDS dataset at a time, across processes, for `prepare` and the pipeline."""

import contextlib
import fcntl
import glob
import os
import shutil

from absl import logging


@contextlib.contextmanager
def held(dataset_dir: str):
  """Holds the lock on preparing the dataset (or builder config) of `dataset_dir`, the folder of
  its version folders (other preparations wait), and removes what a killed preparation left.
  TFDS builds in `incomplete.*` beside the version folder and renames it when done, so no run
  reads a partial dataset; a kill -9 leaves that folder behind (any other stop removes it), and
  only while holding this lock is it known to be no live preparation's."""
  os.makedirs(dataset_dir, exist_ok=True)
  with open(os.path.join(dataset_dir, '.prepare.lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
    for leftover in glob.glob(os.path.join(dataset_dir, 'incomplete.*')):
      logging.warning('removing %s, left by a preparation that was killed', leftover)
      shutil.rmtree(leftover)
    yield

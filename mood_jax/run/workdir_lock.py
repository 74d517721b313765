"""One run per workdir: process 0 holds an exclusive lock on WORKDIR/.lock for the whole run.

The lock is `flock`, which the kernel drops when its holder dies, kill -9 included, so a lock
left by a killed run never blocks the next one. The file names its holder (host, pid, start
time): a second run that finds the lock held stops with that name, and a run that finds a
name in a free lock knows the previous holder was killed, takes the lock over and logs it.
By hand rather than the `filelock` package, which locks the same way but neither records nor
reports the holder.
"""

import contextlib
import datetime
import errno
import fcntl
import os
import socket

import jax
from absl import logging

from mood_jax.errors import UserError

LOCK_FILE = '.lock'
_held_path = None  # the lock file this process holds: `release_at_exit` empties it


def _holder() -> str:
  started = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
  return f'host {socket.gethostname()}, pid {os.getpid()}, started {started}'


@contextlib.contextmanager
def held(workdir: str):
  """Holds `workdir`'s lock (created with the workdir) in the `with` body; a UserError
  naming the holder if another live run holds it."""
  global _held_path
  if jax.process_index() != 0:  # one multi-process run: process 0 holds it for all
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise
      f.seek(0)
      holder = f.read().strip() or 'its holder is starting'
      raise UserError(f'workdir {workdir} is in use by another run ({holder}): wait for it to '
                      'end, or use another workdir') from None
    f.seek(0)
    previous = f.read().strip()
    if previous:  # a clean exit empties the file
      logging.warning('workdir %s: took over the lock of a run that stopped without '
                      'releasing it (%s)', workdir, previous)
    f.seek(0)
    f.truncate()
    f.write(_holder() + '\n')
    f.flush()
    _held_path = path
    try:
      yield
    finally:  # emptied, not removed: a run opening the old file would lock a deleted one
      _held_path = None
      f.seek(0)
      f.truncate()
      # closing the file releases the lock


def release_at_exit() -> None:
  """Empties the held lock's file, for a process about to `os._exit` (the kernel then
  drops the lock): its next run starts without a takeover warning."""
  if _held_path is not None:
    os.truncate(_held_path, 0)

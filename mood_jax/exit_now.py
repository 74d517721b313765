"""Ending the process at once, from any thread, with one line on stderr.

By os._exit, not by raising: an exception raised wherever the main thread happens to be can
leave a lock inside a library's thread pool held, and unwinding then waits on it forever
(seen in orbax's CheckpointManager, whose executor joins a worker blocked on the semaphore
lock the interrupted thread took); and in a multi-process run, a normal exit waits at JAX's
shutdown barrier for processes that may be gone (then aborts, status 134). os.write: stderr's
buffered writer may be mid-write in the interrupted code. All the run writes is atomic, so
nothing is lost.
"""

import os
from typing import NoReturn

from absl import logging

from mood_jax.run import workdir_lock

# The exit status of a run stopped with everything saved (a preemption, a lost peer, a stall);
# launch scripts rerun the same command on it, and the run resumes.
PREEMPTED_EXIT_CODE = 42


def exit_now(line: str, status: int) -> NoReturn:
  """`line` (if any) on stderr, then exit with `status`."""
  logging.flush()
  workdir_lock.release_at_exit()
  if line:
    os.write(2, f'{line}\n'.encode())
  os._exit(status)

"""The watchdog: a run that makes no progress for `config.stall_timeout_s` (a step, a
collective or an evaluation that hangs) dumps every thread's stack to stderr and exits 42,
so that launchers rerun it and it resumes from its last checkpoint.

Progress is told by `beat(what)` where it is made: each training step, each evaluation
batch, each scorer fit. One watchdog per process, at module level as logging is: the places
that beat are deep in the stages, and passing an object down to each would change every
signature on the way for one line.
"""

import contextlib
import faulthandler
import sys
import threading
import time
from typing import Callable

from mood_jax.exit_now import PREEMPTED_EXIT_CODE, exit_now


def _dump_stacks_and_exit(line: str) -> None:
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  exit_now(line, PREEMPTED_EXIT_CODE)


class Watchdog:
  """Calls `on_stall(line)` (by default: every thread's stack, then exit 42) from its own
  thread once `timeout_s` pass without a `beat`."""

  def __init__(self, timeout_s: float,
               on_stall: Callable[[str], None] = _dump_stacks_and_exit):
    self._timeout_s, self._on_stall = timeout_s, on_stall
    # Paused until the first beat: what comes before it (restoring, initializing) compiles.
    self._last, self._what, self._paused = time.monotonic(), 'the start', True
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name='watchdog', daemon=True)

  def beat(self, what: str, compiling: bool = False) -> None:
    """Progress: `what` happened. `compiling`: what follows compiles first (minutes for a
    large model), so the watch pauses until the next beat."""
    self._paused, self._last, self._what = compiling, time.monotonic(), what

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self._timeout_s / 10)):
      idle = time.monotonic() - self._last
      if idle > self._timeout_s and not self._paused:
        self._stop.set()
        self._on_stall(
            f'stalled: no progress for {idle:.0f}s since {self._what} (a step, collective or '
            'evaluation hangs; every thread\'s stack is above). Rerun the same command to '
            f'resume (exit status {PREEMPTED_EXIT_CODE}); --config.stall_timeout_s sets the wait')

  def __enter__(self) -> 'Watchdog':
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()


_active: Watchdog | None = None


def beat(what: str, compiling: bool = False) -> None:
  """Tells the running watchdog, if any, that `what` (e.g. 'pretrain step 12') happened;
  see Watchdog.beat for `compiling`."""
  if _active is not None:
    _active.beat(what, compiling)


@contextlib.contextmanager
def watching(timeout_s: float, on_stall: Callable[[str], None] = _dump_stacks_and_exit):
  """A watchdog over the `with` body (none for `timeout_s` 0, or inside another's body)."""
  global _active
  if not timeout_s or _active is not None:
    yield
    return
  with Watchdog(timeout_s, on_stall) as _active:
    try:
      yield
    finally:
      _active = None

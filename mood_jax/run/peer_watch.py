"""The processes of a multi-process run watch each other: one that dies or stops answering is
a preemption of the whole run, not a crash.

JAX's distributed runtime notices a lost process only by its missed heartbeats, and then ends
every other process with a C++ fatal error (status 134, which launchers read as a crash); its
hook for that (`missed_heartbeat_callback`) is not reachable from `jax.distributed.initialize`,
and a Python callable given to the client directly aborts on its status argument (std::bad_cast,
jaxlib 0.10.2). So, by hand: each process counts up its own key in the coordination service's
key-value store (JAX's, where orbax keeps its barriers too) and reads everyone's in one call; a
peer whose count stands still for `timeout_s`, or a coordinator that stops answering for as
long, ends this process with one line naming the lost process and the last checkpoint, and
status 42, so that launchers restart every process and the run resumes from there. JAX's own
heartbeat timeout is set longer (`parallel.initialize_distributed`), as a backstop.

A process that ends through Python (done, or an error it reports itself) marks itself exited
first; an exited peer is not lost.
"""

import threading
import time
from typing import Callable, NoReturn

from mood_jax.exit_now import PREEMPTED_EXIT_CODE, exit_now

ALIVE = 'mood_jax/alive/'
EXITED = 'mood_jax/exited/'


class PeerWatch:
  """Beats this process's count and judges the others', in two daemon threads: the judge
  makes no call that can block, so a coordinator that hangs instead of refusing is noticed
  too. `on_lost(line)` ends the process (exit_now in a run; a recorder in tests);
  `last_checkpoint()` says where a rerun resumes, e.g. 'pretrain step 40'."""

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float,
               last_checkpoint: Callable[[], str], coordinator: str = 'the coordinator',
               on_lost: Callable[[str], None] | None = None):
    self._client, self._me, self._timeout_s = client, process_id, timeout_s
    self._peers = [p for p in range(num_processes) if p != process_id]
    self._num_processes, self._coordinator = num_processes, coordinator
    self._last_checkpoint = last_checkpoint
    self._on_lost = on_lost or (lambda line: self.leave(line, PREEMPTED_EXIT_CODE))
    self._interval_s = min(1.0, timeout_s / 5)
    self._lock = threading.Lock()
    now = time.monotonic()
    self._seen = {p: (None, now) for p in self._peers}  # peer: (count, when it last changed)
    self._exited: set[int] = set()
    self._answered = now  # the coordinator's last answer
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._beat, name='peer_watch_beat', daemon=True),
                     threading.Thread(target=self._judge, name='peer_watch_judge', daemon=True)]

  def start(self) -> 'PeerWatch':
    for thread in self._threads:
      thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.is_set():
      try:
        self._client.key_value_increment(f'{ALIVE}{self._me}', 1)
        counts = dict(self._client.key_value_dir_get(ALIVE))
        exited = {int(key[len(EXITED):]) for key, _ in self._client.key_value_dir_get(EXITED)}
      except Exception:  # pylint: disable=broad-except  # unreachable: the judge decides
        self._stop.wait(self._interval_s)
        continue
      now = time.monotonic()
      with self._lock:
        self._answered, self._exited = now, exited
        for peer in self._peers:
          count = counts.get(f'{ALIVE}{peer}')
          if count != self._seen[peer][0]:
            self._seen[peer] = (count, now)
      self._stop.wait(self._interval_s)

  def _silent(self) -> list[int]:
    """The peers, not exited, whose count stood still for timeout_s."""
    now = time.monotonic()
    with self._lock:
      return [p for p in self._peers
              if p not in self._exited and now - self._seen[p][1] > self._timeout_s]

  def lost(self) -> str | None:
    """The line for a lost peer or coordinator, or None while all is well."""
    if time.monotonic() - self._answered > self._timeout_s:
      what = f'process 0 (the coordinator at {self._coordinator}) does not answer'
    else:
      silent = self._silent()
      if not silent:
        return None
      what = (f'process{"es" if len(silent) > 1 else ""} {", ".join(map(str, silent))} '
              'gave no sign of life')
    return (f'lost a peer: {what} for {self._timeout_s:g}s (killed, preempted or unreachable; '
            f'process {self._me} of {self._num_processes} stops too). Last checkpoint: '
            f'{self._last_checkpoint()}; rerun every process to resume from it (exit status '
            f'{PREEMPTED_EXIT_CODE})')

  def exited_peers(self) -> list[int]:
    with self._lock:
      return sorted(self._exited)

  def _judge(self) -> None:
    while not self._stop.wait(self._interval_s):
      line = self.lost()
      if line is not None:
        self._stop.set()
        self._on_lost(line)

  def wait_for_verdict(self) -> str | None:
    """After a collective failed: waits until a lost peer is judged (on_lost then ends the
    process), at most `timeout_s` and a beat; the line for an exited peer, else None (the
    failure was not a peer's loss)."""
    deadline = time.monotonic() + self._timeout_s + 2 * self._interval_s
    while time.monotonic() < deadline and not self._stop.is_set():
      exited = self.exited_peers()
      if exited:
        return (f'process {", ".join(map(str, exited))} ended before process {self._me} (its '
                f'log says why), which stops too. Last checkpoint: {self._last_checkpoint()} '
                f'(exit status {PREEMPTED_EXIT_CODE})')
      time.sleep(self._interval_s / 2)
    return None

  def leave(self, line: str, status: int) -> NoReturn:
    """Ends this process with `line` and `status`, marked exited first. Process 0 goes last
    (waiting at most timeout_s for the others to mark themselves): JAX aborts a process
    whose coordinator is gone at once (status 134), before it could say anything."""
    gone = set(self._silent())  # lost peers never mark themselves
    self.stop()
    deadline = time.monotonic() + self._timeout_s
    while self._me == 0 and time.monotonic() < deadline:
      try:
        exited = {int(key[len(EXITED):]) for key, _ in self._client.key_value_dir_get(EXITED)}
      except Exception:  # pylint: disable=broad-except  # the service is failing: go
        break
      if set(self._peers) <= exited | gone:
        break
      time.sleep(self._interval_s / 2)
    exit_now(line, status)

  def stop(self) -> None:
    """Marks this process exited (so that peers still finishing do not take it for lost) and
    stops watching."""
    if self._stop.is_set():
      return
    self._stop.set()
    try:
      self._client.key_value_set(f'{EXITED}{self._me}', 'exited', allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the coordinator is gone: nobody asks
      pass

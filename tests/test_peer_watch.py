"""The peer watch and the watchdog in one process: a key-value store that a test controls
stands in for JAX's coordination service (tests/test_multihost.py runs real processes)."""

import threading
import time

import pytest

from mood_jax import watchdog
from mood_jax.run import peer_watch


class FakeStore:
  """The client calls the watch makes, over a dict; `down` makes every call fail as a gone
  coordinator's do."""

  def __init__(self):
    self.values, self.down, self.lock = {}, False, threading.Lock()

  def _check(self):
    if self.down:
      raise RuntimeError('UNAVAILABLE: Socket closed')

  def key_value_increment(self, key, increment):
    self._check()
    with self.lock:
      self.values[key] = str(int(self.values.get(key, 0)) + increment)
      return int(self.values[key])

  def key_value_dir_get(self, prefix):
    self._check()
    with self.lock:
      return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]

  def key_value_set(self, key, value, allow_overwrite=False):
    self._check()
    with self.lock:
      self.values[key] = value


def _watch(store, lost, timeout_s=0.5, process_id=0):
  return peer_watch.PeerWatch(store, process_id, 2, timeout_s, lambda: 'pretrain step 40',
                              coordinator='127.0.0.1:1234', on_lost=lost.append).start()


def _peer_beats(store, peer, seconds):
  end = time.monotonic() + seconds
  while time.monotonic() < end:
    store.key_value_increment(f'{peer_watch.ALIVE}{peer}', 1)
    time.sleep(0.05)


def _wait_for(lost, seconds):
  end = time.monotonic() + seconds
  while not lost and time.monotonic() < end:
    time.sleep(0.02)


def test_a_peer_that_stops_beating_is_lost_with_one_line_naming_it_and_the_checkpoint():
  store, lost = FakeStore(), []
  watch = _watch(store, lost)
  _peer_beats(store, 1, 1.5)  # alive for three timeouts: not lost
  assert lost == []
  stopped = time.monotonic()
  _wait_for(lost, 3)
  watch.stop()
  assert time.monotonic() - stopped < 1.5  # the timeout and a beat
  line, = lost
  assert 'process 1 gave no sign of life for 0.5s' in line and 'process 0 of 2' in line
  assert 'Last checkpoint: pretrain step 40' in line and 'exit status 42' in line
  assert '\n' not in line


def test_a_peer_that_exited_is_not_lost_and_a_failed_collective_then_names_it():
  store, lost = FakeStore(), []
  watch = _watch(store, lost)
  _peer_beats(store, 1, 0.3)
  peer = peer_watch.PeerWatch(store, 1, 2, 0.5, lambda: '', on_lost=lost.append)
  peer.stop()  # as a process that ends through Python does
  time.sleep(1.5)
  assert lost == []
  line = watch.wait_for_verdict()
  watch.stop()
  assert line.startswith('process 1 ended before process 0') and 'pretrain step 40' in line


def test_a_coordinator_that_stops_answering_is_lost():
  store, lost = FakeStore(), []
  watch = _watch(store, lost, process_id=1)
  _peer_beats(store, 0, 0.3)
  store.down = True
  _wait_for(lost, 3)
  watch.stop()
  line, = lost
  assert 'process 0 (the coordinator at 127.0.0.1:1234) does not answer' in line


def test_a_failed_collective_without_a_lost_peer_is_not_explained_away():
  store, lost = FakeStore(), []
  watch = _watch(store, lost, timeout_s=0.3)
  beating = threading.Thread(target=_peer_beats, args=(store, 1, 2))
  beating.start()
  assert watch.wait_for_verdict() is None  # a bug of ours: main shows its traceback
  beating.join()
  watch.stop()
  assert lost == []


def test_process_0_leaves_after_the_others(monkeypatch):
  """JAX aborts a process whose coordinator is gone: process 0 waits for the others' marks."""
  store, exits = FakeStore(), []
  monkeypatch.setattr(peer_watch, 'exit_now', lambda line, status: exits.append(
      (line, status, time.monotonic())))
  coordinator = _watch(store, [], timeout_s=5)
  peer = _watch(store, [], timeout_s=5, process_id=1)
  leaving = threading.Thread(target=coordinator.leave, args=('error: x', 1))
  leaving.start()
  time.sleep(0.5)
  assert exits == []  # process 1 is still running
  peer.leave('error: x', 1)
  leaving.join(timeout=5)
  assert [(line, status) for line, status, _ in exits] == [('error: x', 1)] * 2
  assert exits[0][2] <= exits[1][2]  # process 1 first


def test_the_watchdog_fires_after_the_timeout_without_beats_only():
  stalls = []
  with watchdog.watching(0.4, stalls.append):
    for step in range(8):  # 1.2s of steady progress
      watchdog.beat(f'pretrain step {step}')
      time.sleep(0.15)
    assert stalls == []
    _wait_for(stalls, 3)
  line, = stalls
  assert line.startswith('stalled: no progress for') and 'since pretrain step 7' in line
  assert 'exit status 42' in line and 'stall_timeout_s' in line


def test_the_watchdog_does_not_time_compilation():
  stalls = []
  with watchdog.watching(0.3, stalls.append):
    time.sleep(0.8)  # before the first beat
    watchdog.beat('pretrain step 1', compiling=True)
    time.sleep(0.8)
    assert stalls == []
    watchdog.beat('pretrain step 2')
    _wait_for(stalls, 3)
  assert 'since pretrain step 2' in stalls[0]


def test_no_watchdog_when_the_timeout_is_zero():
  with watchdog.watching(0, pytest.fail):
    assert watchdog._active is None  # pylint: disable=protected-access

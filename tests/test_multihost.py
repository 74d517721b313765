"""Two local processes as two hosts (`jax.distributed` on 127.0.0.1), and what goes wrong
with them: a process killed in each stage, a hung process, processes that run different
things, a coordinator that is not there. The in-process tests of the same parts are in
tests/test_peer_watch.py and tests/test_same_run.py."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED = 42
PEER_TIMEOUT_S = 20  # a CPU-starved test machine can stall a beat thread for seconds
_STAGES = 'pretrain,finetune,evaluate'
_SETTINGS = [f'--config.stages={_STAGES}', '--config.evaluate.models=finetune',
             '--config.evaluate.scorers=mahalanobis_mood,msp', '--config.evaluate.sweep=',
             "--config.data.ood_sets=('uniform_noise',)", '--config.evaluate.detector.write=False',
             f'--config.peer_timeout_s={PEER_TIMEOUT_S}']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'mood_jax.main', '--config=configs/digits.py:smoke',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *_SETTINGS, *extra]


class TwoProcesses:
  """Processes 0 and 1 of one run, each logging to its own file; `extra[i]` are process
  i's own flags."""

  def __init__(self, workdir, data_dir, env, extra=((), ())):
    port = _free_port()
    self.logs = [f'{workdir}.process{i}.log' for i in range(2)]
    self.procs = []
    for i in range(2):
      with open(self.logs[i], 'w') as log:
        self.procs.append(subprocess.Popen(
            [*_command(workdir, data_dir, *extra[i]), f'--coordinator_address=127.0.0.1:{port}',
             '--num_processes=2', f'--process_id={i}'], cwd=REPO, env=env, stdout=log,
            stderr=subprocess.STDOUT))

  def log(self, i) -> str:
    with open(self.logs[i], errors='replace') as f:
      return f.read()

  def wait_for(self, pattern: str, i: int = 0, timeout_s: float = 600) -> None:
    end = time.monotonic() + timeout_s
    while not re.search(pattern, self.log(i)):
      assert time.monotonic() < end and self.procs[i].poll() is None, self.log(i)[-3000:]
      time.sleep(0.05)

  def wait(self, timeout_s: float = 600) -> list[int]:
    return [proc.wait(timeout=timeout_s) for proc in self.procs]

  def kill(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()


@pytest.fixture
def processes():
  started = []
  yield lambda *args, **kwargs: started.append(TwoProcesses(*args, **kwargs)) or started[-1]
  for two in started:
    two.kill()


def _results(workdir) -> list:
  with open(os.path.join(workdir, 'results', 'results.json')) as f:
    return json.load(f)['rows']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir, env):
  workdir = str(tmp_path_factory.mktemp('uninterrupted') / 'workdir')
  two = TwoProcesses(workdir, data_dir, env)
  try:
    assert two.wait(timeout_s=1800) == [0, 0], two.log(0)[-3000:]
  finally:
    two.kill()
  return _results(workdir)


@pytest.mark.slow  # a two-process run to a hang and past the watchdog
def test_a_hung_process_ends_both_with_their_stacks_and_status_42(processes, data_dir, env,
                                                                   tmp_path):
  # The watchdog well before the peer watch: a stopped process is silent to both.
  two = processes(str(tmp_path / 'workdir'), data_dir, env,
                  extra=[('--config.stall_timeout_s=60', '--config.peer_timeout_s=600')] * 2)
  two.wait_for(r'\[pretrain\] step 2/')
  os.kill(two.procs[1].pid, signal.SIGSTOP)
  assert two.procs[0].wait(timeout=120) == PREEMPTED, two.log(0)[-3000:]
  os.kill(two.procs[1].pid, signal.SIGCONT)  # its own watchdog sees the time it was stopped
  assert two.procs[1].wait(timeout=120) == PREEMPTED, two.log(1)[-3000:]
  for i in range(2):
    log = two.log(i)
    assert 'Thread 0x' in log and 'most recent call first' in log  # faulthandler's stacks
    assert log.strip().splitlines()[-1].startswith('stalled: no progress for')


@pytest.mark.slow  # two processes to the start of the run (about half a minute)
def test_processes_that_run_different_things_all_stop_naming_the_difference(
    processes, data_dir, env, tmp_path):
  two = processes(str(tmp_path / 'workdir'), data_dir, env,
                  extra=[(), ('--config.seed=1', '--config.pretrain.lr=0.5')])
  assert two.wait(timeout_s=300) == [1, 1]
  for i in range(2):
    last_line = two.log(i).strip().splitlines()[-1]
    assert last_line.startswith('error: the processes of this run do not run the same thing '
                                '(process 1: config fields pretrain.lr, seed)')
  assert not os.path.exists(tmp_path / 'workdir')  # before any work


def test_a_coordinator_that_is_not_there_is_named_after_the_wait(tmp_path, env):
  address = f'127.0.0.1:{_free_port()}'
  proc = subprocess.run(
      [*_command(tmp_path / 'workdir', tmp_path / 'data', '--config.coordinator_timeout_s=2'),
       f'--coordinator_address={address}', '--num_processes=2', '--process_id=1'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f'error: could not join the run at coordinator {address} within 2s (process 1 of 2)')


@pytest.mark.slow  # three interrupted runs and their reruns, two processes each: minutes
# The smoke config logs (and saves) every 2 steps of 4.
@pytest.mark.parametrize('stage, pattern', [
    ('pretrain', r'\[pretrain\] step 2/'), ('finetune', r'\[finetune\] step 2/'),
    ('evaluate', r'\[inference\] ')])
# Process 1: a lost process 0 (the coordination service's host) makes JAX abort the others
# at once, status 134, which the launchers read (tests/test_launch.py).
@pytest.mark.parametrize('victim', [1])
def test_a_killed_process_is_a_preemption_and_the_rerun_matches_an_uninterrupted_run(
    stage, pattern, victim, uninterrupted, processes, data_dir, env, tmp_path):
  workdir = str(tmp_path / 'workdir')
  two = processes(workdir, data_dir, env)
  two.wait_for(pattern)
  two.procs[victim].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  survivor = 1 - victim
  assert two.procs[survivor].wait(timeout=120) == PREEMPTED, two.log(survivor)[-3000:]
  print(f'{stage}, process {victim} killed: process {survivor} out after '
        f'{time.monotonic() - killed:.1f}s')  # the bound: peer_timeout_s and two beats
  last_line = two.log(survivor).strip().splitlines()[-1]
  assert last_line.startswith(f'lost a peer: process') and 'Last checkpoint:' in last_line
  assert f'exit status {PREEMPTED}' in last_line and 'Traceback' not in two.log(survivor)

  rerun = processes(workdir, data_dir, env)
  assert rerun.wait(timeout_s=1800) == [0, 0], rerun.log(0)[-3000:]
  assert _results(workdir) == uninterrupted

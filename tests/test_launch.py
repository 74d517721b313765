"""The launch scripts: their dry-run commands, and the relaunch after a preemption."""

import os
import shutil
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED = 42


def _launch(script, *args, env=None):
  return subprocess.run([os.path.join(REPO, 'launch', script), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, **(env or {})})


@pytest.mark.parametrize('script', ['gpu_single_host.sh', 'tpu_vm.sh', 'slurm.sh'])
def test_help(script):
  proc = _launch(script, '--help')
  assert proc.returncode == 0 and proc.stdout.startswith('usage:')


def test_preempted_exit_code_matches_the_training_loop():
  from mood_jax.train import loop as train_loop
  assert train_loop.PREEMPTED_EXIT_CODE == PREEMPTED
  for script in ('gpu_single_host.sh', 'tpu_vm.sh', 'slurm.sh'):
    with open(os.path.join(REPO, 'launch', script)) as f:
      assert f'PREEMPTED={PREEMPTED}' in f.read()


def test_tpu_vm_create_and_run_commands():
  create = _launch('tpu_vm.sh', '--dry-run', '--name', 'ood', '--type', 'v4-32', '--spot',
                   'create').stdout
  assert create.split() == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ood',
                            '--zone=us-central2-b', '--accelerator-type=v4-32',
                            '--version=tpu-ubuntu2204-base', '--spot']
  run = _launch('tpu_vm.sh', '--dry-run', '--name', 'ood', '--spot', 'run', 'configs/imagenet.py',
                'gs://bucket/run', '--config.seed=1', env={'TPU_STATE_DIR': '/state'})
  supervisor, note, remote = run.stdout.splitlines()
  # The supervision loop runs detached from the terminal (a new session), its log in a file.
  assert supervisor == (f'setsid nohup {REPO}/launch/tpu_vm.sh --name ood --zone us-central2-b '
                        '--type v4-8 --version tpu-ubuntu2204-base --max-restarts 20 --spot '
                        'supervise configs/imagenet.py gs://bucket/run --config.seed=1 > '
                        '/state/ood.log 2>&1 < /dev/null &')
  assert remote.startswith('gcloud compute tpus tpu-vm ssh ood --zone=us-central2-b --worker=all ')
  # %q-quoted for the remote shell: unquote before looking for the command.
  assert ('python -m mood_jax.main --config=configs/imagenet.py --workdir=gs://bucket/run '
          '--config.seed=1') in remote.replace('\\', '')


def test_tpu_vm_setup_installs_the_pinned_jax_and_refuses_uncommitted_changes(tmp_path):
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    jax_version, = [line.split('==')[1].strip() for line in f if line.startswith('jax==')]
  setup = _launch('tpu_vm.sh', '--dry-run', '--allow-dirty', 'setup').stdout.replace('\\', '')
  assert '--worker=all' in setup and f"pip install -q 'jax[tpu]=={jax_version}' gcsfs" in setup
  assert f'git -C {REPO} archive' in setup

  # A checkout with a change that `git archive HEAD` would leave out.
  (tmp_path / 'launch').mkdir()
  shutil.copy(os.path.join(REPO, 'launch', 'tpu_vm.sh'), tmp_path / 'launch')
  (tmp_path / 'requirements.txt').write_text('jax==0.0.1\n')
  git = ['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c', 'user.email=t@t']
  subprocess.run([*git, 'init', '-q'], check=True)
  subprocess.run([*git, 'add', '.'], check=True)
  subprocess.run([*git, 'commit', '-qm', 'c'], check=True)
  (tmp_path / 'requirements.txt').write_text('jax==0.0.2\n')
  script = str(tmp_path / 'launch' / 'tpu_vm.sh')
  refused = subprocess.run([script, '--dry-run', 'setup'], capture_output=True, text=True)
  assert refused.returncode == 1 and refused.stdout == ''
  assert 'uncommitted changes' in refused.stderr and 'M requirements.txt' in refused.stderr


def test_slurm_submits_a_requeueable_job_that_runs_one_process_per_node():
  submit = _launch('slurm.sh', '--dry-run', '--nodes', '4', 'configs/digits.py', '/w').stdout
  assert submit.startswith('sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 ')
  assert '--requeue' in submit and '--signal=TERM@300' in submit
  job = _launch('slurm.sh', '--dry-run', 'configs/digits.py', '/w', '--config.seed=2',
                env={'MOOD_IN_JOB': '1'}).stdout
  assert job.startswith('srun --kill-on-bad-exit=1 bash -c ')
  assert ('python -m mood_jax.main --config=configs/digits.py --workdir=/w --config.seed=2 '
          '>> mood_jax-0.task$SLURM_PROCID.log') in job.replace('\\', '')


def _fake_python(tmp_path, statuses):
  """An interpreter stand-in that exits with the next of `statuses` and logs each call."""
  calls = tmp_path / 'calls'
  script = tmp_path / 'python'
  script.write_text(f"""#!/usr/bin/env bash
echo "$@" >> {calls}
n=$(wc -l < {calls})
statuses=({' '.join(map(str, statuses))})
exit ${{statuses[$((n - 1))]}}
""")
  script.chmod(0o755)
  return str(script), calls


def test_gpu_launcher_reruns_after_preemption_only(tmp_path):
  python, calls = _fake_python(tmp_path, [PREEMPTED, PREEMPTED, 0])
  proc = _launch('gpu_single_host.sh', 'configs/digits.py', '/w', env={'PYTHON': python})
  assert proc.returncode == 0
  assert calls.read_text().splitlines() == ['-m mood_jax.main --config=configs/digits.py '
                                            '--workdir=/w'] * 3

  (tmp_path / 'failing').mkdir()
  python, calls = _fake_python(tmp_path / 'failing', [1, 0])
  proc = _launch('gpu_single_host.sh', 'configs/digits.py', '/w', env={'PYTHON': python})
  assert proc.returncode == 1 and len(calls.read_text().splitlines()) == 1


def test_tpu_vm_run_returns_and_leaves_a_detached_supervisor(tmp_path):
  """`run` with a stand-in gcloud: the supervisor runs on in its own session, logs to its
  file, and ends when worker 0's run reports success."""
  bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f"""#!/usr/bin/env bash
echo "$@" >> {calls}
case "$*" in
  *describe*) echo READY ;;
  *mood_jax.main*) sleep 1; echo 'mood_jax-status t1v-w-0 0' ;;
esac
""")
  gcloud.chmod(0o755)
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'TPU_STATE_DIR': str(tmp_path / 'state')}
  proc = _launch('tpu_vm.sh', '--name', 'ood', 'run', 'configs/digits.py', 'gs://b/w', env=env)
  assert proc.returncode == 0 and 'supervisor started' in proc.stdout
  pid = int((tmp_path / 'state' / 'ood.pid').read_text())
  for _ in range(100):  # until it has exec'd setsid (the run takes over a second: sleep 1)
    if os.getsid(pid) == pid:
      break
    time.sleep(0.01)
  assert os.getsid(pid) == pid != os.getsid(0)  # a session of its own: not the terminal's
  log = tmp_path / 'state' / 'ood.log'
  for _ in range(300):
    if 'finished' in log.read_text():
      break
    time.sleep(0.1)
  assert 'tpu_vm.sh: finished' in log.read_text()
  assert any('--worker=all' in line and 'mood_jax.main' in line
             for line in calls.read_text().splitlines())


def _executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


# The status of a process that JAX aborted since its coordinator was gone (134, and JAX's
# line on it in the log).
JAX_ABORT = '134j'


def _fake_workers(tmp_path, statuses):
  """A bin dir whose `python` exits with its worker's (the WORKER variable's) status in its
  attempt (an item of `statuses`: one status per worker), after a log line naming both."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(parents=True)
  (tmp_path / 'statuses').write_text(''.join(f'{a} {b}\n' for a, b in statuses))
  _executable(bin_dir / 'python', f"""#!/usr/bin/env bash
attempt=$(( $(cat {tmp_path}/attempt.$WORKER 2>/dev/null || echo 0) + 1 ))
echo $attempt > {tmp_path}/attempt.$WORKER
echo "worker $WORKER, attempt $attempt: $*"
status=$(sed -n "${{attempt}}p" {tmp_path}/statuses | cut -d' ' -f$((WORKER + 1)))
if [ $status = {JAX_ABORT} ]; then
  echo 'F1207 client.h:80] Terminating process because the JAX distributed service detected fatal errors.'
  status=134
fi
exit $status
""")
  return bin_dir


# srun: the tasks one after the other, SLURM_PROCID set; srun's status is the worst.
_FAKE_SRUN = """#!/usr/bin/env bash
shift  # --kill-on-bad-exit=1
worst=0
for task in 0 1; do
  SLURM_PROCID=$task WORKER=$task "$@"; s=$?
  if [ $s -gt $worst ]; then worst=$s; fi
done
exit $worst
"""


def _slurm_job(tmp_path, statuses, restart_count=0):
  """One attempt of the batch job under a fake srun (two tasks) and a fake scontrol that logs
  its calls; (the job's process, scontrol's calls)."""
  bin_dir = _fake_workers(tmp_path, statuses)
  _executable(bin_dir / 'srun', _FAKE_SRUN)
  _executable(bin_dir / 'scontrol', f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol\n')
  proc = subprocess.run(
      [os.path.join(REPO, 'launch', 'slurm.sh'), '--max-restarts', '3', 'configs/digits.py',
       '/w'], cwd=tmp_path, capture_output=True, text=True, timeout=60,
      env={**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'MOOD_IN_JOB': '1',
           'SLURM_JOB_ID': '7', 'SLURM_RESTART_COUNT': str(restart_count)})
  calls = tmp_path / 'scontrol'
  return proc, calls.read_text().splitlines() if calls.exists() else []


def test_slurm_job_requeues_on_preemption_up_to_the_limit(tmp_path):
  proc, calls = _slurm_job(tmp_path / 'a', [(PREEMPTED, PREEMPTED)], restart_count=1)
  assert proc.returncode == PREEMPTED and calls == ['requeue 7']
  assert 'restart 2 of at most 3' in proc.stderr
  proc, calls = _slurm_job(tmp_path / 'b', [(PREEMPTED, PREEMPTED)], restart_count=3)
  assert proc.returncode == PREEMPTED and calls == []
  assert 'still preempted after 3 restarts; giving up' in proc.stderr
  proc, calls = _slurm_job(tmp_path / 'c', [(0, 0)])
  assert proc.returncode == 0 and calls == []
  proc, calls = _slurm_job(tmp_path / 'd', [(PREEMPTED, JAX_ABORT)])
  assert proc.returncode == PREEMPTED and calls == ['requeue 7']
  proc, calls = _slurm_job(tmp_path / 'e', [(PREEMPTED, 134)])  # another abort: a crash
  assert proc.returncode == 134 and calls == []


def test_slurm_job_stops_on_a_failure_with_the_failing_tasks_last_log_lines(tmp_path):
  proc, calls = _slurm_job(tmp_path, [(PREEMPTED, 1)])
  assert proc.returncode == 1 and calls == []
  assert 'failed with status 1 on task 1 (mood_jax-7.task1.log)' in proc.stderr
  assert proc.stderr.strip().endswith(
      'worker 1, attempt 1: -m mood_jax.main --config=configs/digits.py --workdir=/w')


def _tpu_supervise(tmp_path, statuses):
  """`supervise` under a fake gcloud whose ssh to --worker=all runs the remote command for two
  workers, each in its own home (~/mood_jax with a venv that puts the fake python first)."""
  bin_dir = _fake_workers(tmp_path, statuses)
  for worker in (0, 1):
    venv = tmp_path / f'home{worker}' / 'mood_jax' / '.venv' / 'bin'
    venv.mkdir(parents=True)
    (venv / 'activate').write_text(f'export PATH={bin_dir}:$PATH WORKER={worker}\n')
  _executable(bin_dir / 'gcloud', f"""#!/usr/bin/env bash
case "$*" in
  *describe*) echo READY ;;
  *--worker=all*)
    command=$(printf '%s\\n' "$@" | sed -n 's/^--command=//p')
    for worker in 0 1; do HOME={tmp_path}/home$worker bash -c "$command"; done ;;
esac
""")
  return subprocess.run(
      [os.path.join(REPO, 'launch', 'tpu_vm.sh'), '--name', 'ood', '--max-restarts', '2',
       'supervise', 'configs/digits.py', 'gs://b/w'], capture_output=True, text=True,
      timeout=60, env={**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}'})


def test_tpu_vm_supervisor_restarts_on_preemption_up_to_the_limit(tmp_path):
  proc = _tpu_supervise(tmp_path / 'a', [(PREEMPTED, PREEMPTED), (JAX_ABORT, PREEMPTED), (0, 0)])
  assert proc.returncode == 0 and 'tpu_vm.sh: finished' in proc.stderr, proc.stderr
  assert 'restart 1 of at most 2' in proc.stderr and 'restart 2 of at most 2' in proc.stderr
  proc = _tpu_supervise(tmp_path / 'b', [(PREEMPTED, PREEMPTED)] * 3)
  assert proc.returncode == PREEMPTED
  assert 'still preempted after 2 restarts; giving up' in proc.stderr


def test_tpu_vm_supervisor_stops_on_a_failure_with_the_failing_workers_last_log_lines(tmp_path):
  proc = _tpu_supervise(tmp_path, [(PREEMPTED, 3)])
  assert proc.returncode == 3 and 'restart' not in proc.stderr, proc.stderr
  assert 'the run failed with status 3 on' in proc.stderr
  assert 'worker 1, attempt 1: -m mood_jax.main --config=configs/digits.py' in proc.stderr
  assert 'worker 0, attempt 1' not in proc.stderr  # a preempted worker's log is not the cause

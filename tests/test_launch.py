"""The launch scripts: their dry-run commands, and the relaunch after a preemption."""

import os
import subprocess

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
  from mood_jax import train_loop
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
  run = _launch('tpu_vm.sh', '--dry-run', '--name', 'ood', 'run', 'configs/imagenet.py',
                'gs://bucket/run', '--config.seed=1').stdout
  assert run.startswith('gcloud compute tpus tpu-vm ssh ood --zone=us-central2-b --worker=all ')
  # %q-quoted for the remote shell: unquote before looking for the command.
  remote = run.replace('\\', '')
  assert ('python -m mood_jax.main --config=configs/imagenet.py --workdir=gs://bucket/run '
          '--config.seed=1') in remote
  setup = _launch('tpu_vm.sh', '--dry-run', 'setup').stdout.replace('\\', '')
  assert '--worker=all' in setup and "jax[tpu]" in setup


def test_slurm_submits_a_requeueable_job_that_runs_one_process_per_node():
  submit = _launch('slurm.sh', '--dry-run', '--nodes', '4', 'configs/digits.py', '/w').stdout
  assert submit.startswith('sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 ')
  assert '--requeue' in submit and '--signal=TERM@300' in submit
  job = _launch('slurm.sh', '--dry-run', 'configs/digits.py', '/w', '--config.seed=2',
                env={'MOOD_IN_JOB': '1'}).stdout
  assert job.strip() == ('srun --kill-on-bad-exit=1 python -m mood_jax.main '
                         '--config=configs/digits.py --workdir=/w --config.seed=2')


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

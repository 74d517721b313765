"""The command line end to end on the smoke config, and its answers to bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs import digits
from mood_jax.run import allocator, config_json, workdir_lock
from mood_jax.stages import evaluate_parts
from mood_jax.train import loop as train_loop
from mood_jax.ood import scorers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, data_dir):
  # Overrides must follow --config (in args), so data_dir goes last.
  cmd = [sys.executable, '-m', 'mood_jax.main', *args, f'--config.data.data_dir={data_dir}']
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_end_to_end_writes_results(smoke_run):
  workdir, proc = smoke_run.workdir, smoke_run  # conftest.py: one run, shared read-only
  with open(os.path.join(workdir, 'results', 'results.json')) as f:
    results = json.load(f)
  ood_sets = {'digits_heldout', 'textures', 'photos', 'lfw_faces', 'uniform_noise',
              'gaussian_blobs'}
  scorers = {'mahalanobis_mood', 'msp', 'energy', 'maxlogit'}
  rows = [r for r in results['rows'] if r['ood_set'] in ood_sets]
  # 'auto' scores both trained classifiers side by side.
  models = {'finetune', 'logit_ft'}
  assert {(r['model'], r['scorer'], r['ood_set']) for r in rows} == {
      (m, s, o) for m in models for s in scorers for o in ood_sets}
  for row in rows:
    for key in ('auroc', 'fpr95', 'aupr_in', 'aupr_out'):
      assert 0.0 <= row[key] <= 1.0, row
  assert set(results['id_accuracy']) == models
  assert all(0.0 <= acc <= 1.0 for acc in results['id_accuracy'].values())
  assert os.path.exists(os.path.join(workdir, 'results', 'results.csv'))
  assert '| mahalanobis_mood |' in proc.stdout  # the Markdown table is printed
  # How the scored model ran; CPU's 'auto' attention is the einsum one.
  assert results['compute'] == {'backend': 'cpu', 'dtype': 'float32', 'attention': 'einsum'}
  assert "compute: {'backend': 'cpu', 'dtype': 'float32', 'attention': 'einsum'}" in proc.stderr
  # CPU training without a caching malloc says how to get faster steps (allocator.py).
  assert ('preloading tcmalloc' in proc.stderr) == (allocator.caching_malloc() is None)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert {m['stage'] for m in logged} == {'pretrain', 'finetune', 'logit_ft'}
  steps = [m for m in logged if m['step'] > 0 and m['kind'] == 'train']
  assert all({'loss', 'lr', 'images_per_s'} <= set(m) for m in steps)
  # The default logit_ft loss is UM's flooding, and the report says so.
  assert all(0 <= m['flooded'] <= 1 for m in steps if m['stage'] == 'logit_ft')
  assert results['models']['logit_ft'].startswith("loss=um (UM's flooding")
  # gamma over the stage's own training transforms (UM's), and whether the flood acted.
  assert 'from masked_model (ID train, train transforms)' in results['models']['logit_ft']
  assert re.search(r'flooded on \d+% of steps', results['models']['logit_ft'])
  assert re.search(r'\[logit_ft\] (flooded on [\d.]+% of the steps|no step was flooded)',
                   proc.stderr)
  with open(os.path.join(workdir, 'results', 'results.md')) as f:
    assert '- logit_ft: loss=um' in f.read()


def test_progress_lines_tensorboard_and_config_json(smoke_run, tensorboard_steps):
  workdir, proc = smoke_run.workdir, smoke_run
  for stage in ('pretrain', 'finetune', 'logit_ft'):  # totals are the config's: 4 steps
    assert re.search(rf'\[{stage}\] step 2/4 \(50%\), ETA \w+, run ETA \w+: ', proc.stderr)
    assert re.search(rf'\[{stage}\] done: 4 steps in \w+, [\d.e-]+ device-hours on 1 '
                     'devices', proc.stderr)
    assert tensorboard_steps(os.path.join(workdir, 'tensorboard', stage))['train/loss'] == [2, 4]
  # Evaluation during fine-tuning: ID accuracy and msp's AUROC on the validation set.
  finetune = tensorboard_steps(os.path.join(workdir, 'tensorboard', 'finetune'))
  assert finetune['eval/id_accuracy'] == finetune['eval/msp_auroc_letters'] == [2, 4]
  assert '[finetune] eval step 4: id_accuracy=' in proc.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [row for row in map(json.loads, f) if row['kind'] == 'eval']
  assert [(row['stage'], row['step']) for row in evals] == [
      ('finetune', 2), ('finetune', 4), ('logit_ft', 4)]
  assert all(0 <= row['msp_auroc_letters'] <= 1 for row in evals)
  # The evaluate stage's metrics beside the curves, one point each.
  evaluated = tensorboard_steps(os.path.join(workdir, 'tensorboard', 'evaluate'))
  assert evaluated['finetune/msp/auroc/letters'] == evaluated['logit_ft/id_accuracy'] == [0]
  assert evaluated['logit_ft/mahalanobis_mood/fpr95/far_mean'] == [0]
  # config.json: the command line, and the config it resolved to.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert '--config.finetune.eval_every=2' in json.load(f)['command']
  expected = digits.get_config('split,smoke')
  expected.finetune.eval_every, expected.logit_ft.eval_every = 2, 4
  expected.evaluate.detector.update(model='finetune', scorers='mahalanobis_mood,msp',
                                    tprs=(0.95, 0.8))
  expected.data.data_dir = smoke_run.data_dir
  assert config_json.load(os.path.join(workdir, 'config.json')) == expected


def test_finished_stages_are_skipped(smoke_run, tmp_path):
  workdir = _trained_copy(smoke_run, tmp_path)
  proc = _main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
               '--config.stages=pretrain,finetune,logit_ft', data_dir=smoke_run.data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ('pretrain', 'finetune', 'logit_ft'):
    assert f'[{stage}] skipped' in proc.stderr


def test_logit_ft_flooding_umap_teacher(smoke_run, tmp_path):
  """UM's flooding with UMAP scores + weights and logits-based targets, together, from an
  earlier finetune checkpoint."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(smoke_run.workdir, workdir,
                  ignore=shutil.ignore_patterns('logit_ft*', 'results', 'metrics.jsonl'))
  proc = _main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
               '--config.stages=logit_ft,evaluate', '--config.evaluate.models=logit_ft',
               '--config.evaluate.scorers=msp', '--config.logit_ft.init_step=2',
               '--config.logit_ft.umap=both', '--config.logit_ft.teacher_alpha=0.9',
               '--config.logit_ft.eval_every=4', data_dir=smoke_run.data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  # The UM constraint is explicit: gamma is logged and saved, flooding is tracked.
  gamma, = [m['gamma'] for m in logged if m['step'] == 0]
  with open(workdir / 'logit_ft_gamma.json') as f:
    record = json.load(f)
  assert record['gamma'] == gamma > 0 and record['finetune_step'] == 2
  assert record['gamma_transforms'] == 'train'
  assert 'starting from the finetune checkpoint of step 2' in proc.stderr
  assert all(0 <= m['flooded'] <= 1 for m in logged if m['step'] > 0 and m['kind'] == 'train')
  # Evaluated with the UMAP-masked weights, as the evaluate stage scores them.
  assert [m['step'] for m in logged if m['kind'] == 'eval'] == [4]
  assert os.listdir(workdir / 'ckpt' / 'logit_ft' / '4' / 'state')
  with open(workdir / 'results' / 'results.json') as f:
    results = json.load(f)
  assert {r['model'] for r in results['rows']} == {'logit_ft'}
  assert 'from finetune step 2' in results['models']['logit_ft']
  assert 'umap=both' in results['models']['logit_ft']


def test_evaluate_only_runs_every_scorer_with_hparams_chosen_on_validation(smoke_run, tmp_path):
  """Scoring trained checkpoints again, with no training: every scorer, and the hparams of
  those with a grid chosen on the 'letters' validation set, never on a test set."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(smoke_run.workdir, workdir,
                  ignore=shutil.ignore_patterns('results', 'metrics*'))
  proc = _main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
               '--config.stages=evaluate', '--config.evaluate.models=finetune',
               '--config.evaluate.scorers=all', '--config.evaluate.hparams.odin.epsilon=0.002',
               data_dir=smoke_run.data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (workdir / 'metrics.jsonl').exists()  # nothing trained
  with open(workdir / 'results' / 'results.json') as f:
    results = json.load(f)
  assert {r['scorer'] for r in results['rows']} == set(scorers.names())
  assert {r['ood_group'] for r in results['rows'] if r['ood_set'] == 'letters'} == {'validation'}
  hparams, sweeps = results['hparams']['finetune'], results['sweeps']['finetune']
  grids = digits.get_config('split,smoke').evaluate.sweep_grids
  assert set(sweeps) == {'knn', 'react', 'ash_p', 'ash_b', 'ash_s', 'gen', 'vim', 'residual',
                         'scale', 'fdbd', 'nci', 'nnguide', 'relation'}
  for name, record in sweeps.items():
    assert record['ood_sets'] == ['letters']
    assert len(record['trials']) == np.prod([len(v) for v in grids[name].values()])
    for hparam, value in record['chosen'].items():
      assert hparams[name][hparam] == value and value in grids[name][hparam]
  assert hparams['odin'] == {'temperature': 1000., 'epsilon': 0.002}  # set, not swept
  assert 'knn: k=' in proc.stdout and 'chosen by auroc on letters' in proc.stdout


def test_one_class_runs_each_class_and_averages(tmp_path, data_dir):
  """MOOD's one-class protocol: each class alone is ID in turn (MIM pretrain, then its
  encoder's Mahalanobis score), and results/ holds the mean over the classes."""
  workdir = tmp_path / 'workdir'
  proc = _main('--config=configs/digits.py:oneclass=all,smoke', f'--workdir={workdir}',
               '--config.data.id_classes=(3,5)', data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  per_class = {}
  for label in (3, 5):
    with open(workdir / f'class_{label}' / 'results' / 'results.json') as f:
      per_class[label] = {r['ood_set']: r for r in json.load(f)['rows']}
    assert not (workdir / f'class_{label}' / 'ckpt' / 'finetune').exists()  # no labels
  with open(workdir / 'results' / 'results.json') as f:
    results = json.load(f)
  assert {(r['model'], r['scorer']) for r in results['rows']} == {('pretrain', 'mahalanobis_mood')}
  assert results['id_accuracy'] == {}  # no classifier head was trained
  for row in results['rows']:
    np.testing.assert_allclose(row['auroc'], np.mean([per_class[c][row['ood_set']]['auroc']
                                                      for c in (3, 5)]))
  assert 'Mean over the one-class runs of classes 3, 5' in proc.stdout


# The command line's side of bad input: a flag-parsing error and a validation error, each one
# line and a non-zero exit, nothing created. The validation messages themselves are checked
# in-process in test_validation.py.
@pytest.mark.parametrize('args,message', [
    (['--config.finetune.no_such_field=1'], 'no_such_field'),
    (['--config.stages=pretrain,tune'], "unknown stage 'tune': valid choices are pretrain"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, data_dir, args, message):
  workdir = tmp_path / 'workdir'
  proc = _main('--config=configs/digits.py:smoke', f'--workdir={workdir}', *args,
               data_dir=data_dir)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-2000:]
  assert not workdir.exists()  # nothing was created for a run that could not start


def test_workdir_that_is_a_file_is_refused_and_kept(tmp_path, data_dir):
  path = tmp_path / 'results.txt'
  path.write_text('precious')
  proc = _main('--config=configs/digits.py:smoke', f'--workdir={path}', data_dir=data_dir)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert 'is an existing file' in proc.stderr
  assert path.read_text() == 'precious'


def _trained_copy(smoke_run, tmp_path):
  workdir = tmp_path / 'workdir'
  shutil.copytree(smoke_run.workdir, workdir, ignore=shutil.ignore_patterns('results'))
  return workdir


def _error_line(proc) -> str:
  assert proc.returncode not in (0, train_loop.PREEMPTED_EXIT_CODE) and 'Traceback' not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


def test_changed_settings_stop_the_run_unless_allowed_and_then_are_recorded(smoke_run, tmp_path):
  workdir = _trained_copy(smoke_run, tmp_path)
  args = ['--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
          '--config.finetune.lr=0.01', '--config.stages=finetune,evaluate',
          '--config.evaluate.models=finetune', '--config.evaluate.scorers=msp']
  line = _error_line(_main(*args, data_dir=smoke_run.data_dir))
  assert (f'the checkpoints in {workdir} were made under other settings (finetune: '
          "finetune.lr: 0.002 -> 0.01)") in line and '--allow_changed_settings' in line
  assert not (workdir / 'results').exists()
  proc = _main(*args, '--allow_changed_settings', data_dir=smoke_run.data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '[finetune] skipped' in proc.stderr
  with open(workdir / 'results' / 'results.json') as f:
    assert json.load(f)['changed_settings'] == {'finetune': ['finetune.lr: 0.002 -> 0.01']}


def test_a_held_workdir_is_refused_at_once(smoke_run, tmp_path):
  workdir = _trained_copy(smoke_run, tmp_path)
  before = sorted(p.name for p in workdir.rglob('*'))
  with workdir_lock.held(str(workdir)):
    line = _error_line(_main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
                             data_dir=smoke_run.data_dir))
  assert f'workdir {workdir} is in use by another run (host ' in line
  assert f'pid {os.getpid()}, started ' in line
  assert sorted(p.name for p in workdir.rglob('*')) == before


def test_sigterm_during_evaluate_exits_for_a_rerun(smoke_run, tmp_path):
  workdir = _trained_copy(smoke_run, tmp_path)
  cmd = [sys.executable, '-m', 'mood_jax.main', '--config=configs/digits.py:split,smoke',
         f'--workdir={workdir}', '--config.stages=evaluate',
         f'--config.data.data_dir={smoke_run.data_dir}']
  proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:
    if '[evaluate] starting' in line:
      proc.send_signal(signal.SIGTERM)
      break
  stderr = _stderr_within(proc, 120)
  assert proc.returncode == train_loop.PREEMPTED_EXIT_CODE, stderr[-2000:]
  assert 'stopped by SIGTERM: rerun the same command to resume' in stderr
  assert 'Traceback' not in stderr
  assert (workdir / workdir_lock.LOCK_FILE).read_text() == ''  # released


def test_a_stop_signal_as_the_run_ends_exits_0_or_42(smoke_run, data_dir, tmp_path):
  """After the results, while the detector is saved and JAX shuts down: no window where the
  signal's default action (status 143) ends the run."""
  workdir = _trained_copy(smoke_run, tmp_path)
  cmd = [sys.executable, '-m', 'mood_jax.main', '--config=configs/digits.py:split,smoke',
         f'--workdir={workdir}', '--config.stages=evaluate', '--config.evaluate.scorers=msp',
         f'--config.data.data_dir={data_dir}']
  proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:
    if ' detector (' in line:  # its last line, once it is in place
      proc.send_signal(signal.SIGTERM)
      break
  stderr = _stderr_within(proc, 120)
  assert proc.returncode in (0, train_loop.PREEMPTED_EXIT_CODE), stderr[-2000:]
  assert 'Traceback' not in stderr


def test_evaluate_resumes_from_its_finished_model_scorer_parts(smoke_run, data_dir, tmp_path):
  workdir = _trained_copy(smoke_run, tmp_path)
  args = ['--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
          '--config.stages=evaluate', '--config.evaluate.scorers=msp,energy']
  proc = _main(*args, data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'results' / 'results.json') as f:
    whole = json.load(f)
  # As a run stopped in logit_ft's energy fit leaves it.
  shutil.rmtree(workdir / 'results')
  (workdir / evaluate_parts.DIR / 'logit_ft' / 'energy').unlink()
  proc = _main(*args, data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for model in ('finetune', 'logit_ft'):
    assert f'[evaluate] {model}: msp as a stopped run finished it' in proc.stderr
  assert '[evaluate] finetune: energy as a stopped run finished it' in proc.stderr
  assert '[evaluate] logit_ft: energy as a stopped run finished it' not in proc.stderr
  assert proc.stderr.count('[evaluate] energy fitted on') == 1  # logit_ft's, again
  with open(workdir / 'results' / 'results.json') as f:
    assert json.load(f) == whole
  # Another setting: nothing is taken from the parts.
  proc = _main(*args, '--config.evaluate.batch_size=32', data_dir=data_dir)
  assert proc.returncode == 0 and 'as a stopped run finished it' not in proc.stderr


def test_a_config_file_that_is_not_there_is_one_line(tmp_path, data_dir):
  line = _error_line(_main('--config=configs/no_such.py', f'--workdir={tmp_path / "w"}',
                           data_dir=data_dir))
  assert line == ("error: --config: [Errno 2] No such file or directory: 'configs/no_such.py': "
                  'pass an existing config file, e.g. --config=configs/digits.py')


def test_a_bad_data_dir_is_one_line_before_the_workdir_is_locked(tmp_path):
  (tmp_path / 'notes').write_text('precious')
  workdir = tmp_path / 'workdir'
  line = _error_line(_main('--config=configs/digits.py:smoke', f'--workdir={workdir}',
                           data_dir=tmp_path / 'notes' / 'tfds'))
  assert line == (f"error: data.data_dir='{tmp_path / 'notes' / 'tfds'}': {tmp_path / 'notes'} "
                  'is a file, where a directory is needed: use another path')
  line = _error_line(_main('--config=configs/cifar10.py', f'--workdir={workdir}',
                           data_dir=tmp_path / 'empty'))
  assert line.startswith(f'error: cifar10') and f'is not prepared in {tmp_path / "empty"}' in line
  assert not workdir.exists()  # neither the workdir nor its .lock


def _stderr_within(proc, seconds) -> str:
  """The rest of `proc`'s stderr once it exits; a failure, not a hang, if it does not."""
  try:
    return proc.communicate(timeout=seconds)[1]
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f'still running {seconds} s after the stop signal') from None


# A library's worker thread that never finishes, as orbax's executor was seen to leave when
# an exception raised by the signal handler interrupted it mid-lock: exit must not wait on it.
_BLOCKED_WORKER = """
import signal, sys, threading
from mood_jax import main
from mood_jax.run import workdir_lock
never = threading.Event()
with workdir_lock.held(sys.argv[1]):
  threading.Thread(target=never.wait).start()
  signal.signal(signal.SIGTERM, main.stop)
  print('ready', flush=True)
  never.wait()
"""


def test_a_stop_signal_outside_training_exits_even_with_a_stuck_worker_thread(tmp_path):
  proc = subprocess.Popen([sys.executable, '-c', _BLOCKED_WORKER, str(tmp_path)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == 'ready\n', proc.stderr.read()[-2000:]
  proc.send_signal(signal.SIGTERM)
  stderr = _stderr_within(proc, 60)
  assert proc.returncode == train_loop.PREEMPTED_EXIT_CODE, stderr[-2000:]
  assert stderr.endswith('stopped by SIGTERM: rerun the same command to resume (exit status '
                         f'{train_loop.PREEMPTED_EXIT_CODE})\n')
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ''  # released


def test_a_file_in_the_workdir_path_is_one_line(tmp_path, data_dir):
  (tmp_path / 'notes').write_text('precious')
  workdir = tmp_path / 'notes' / 'workdir'
  line = _error_line(_main('--config=configs/digits.py:smoke', f'--workdir={workdir}',
                           data_dir=data_dir))
  assert line == (f'error: Not a directory: {workdir}: a file stands where a directory is '
                  'needed: use another path')
  assert (tmp_path / 'notes').read_text() == 'precious'

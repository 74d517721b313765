"""The command line end to end on the smoke config, and its answers to bad input."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, data_dir):
  # Overrides must follow --config (in args), so data_dir goes last.
  cmd = [sys.executable, '-m', 'mood_jax.main', *args, f'--config.data.data_dir={data_dir}']
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('run') / 'workdir')
  proc = _main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
               data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_end_to_end_writes_results(smoke_run):
  workdir, proc = smoke_run
  with open(os.path.join(workdir, 'results', 'results.json')) as f:
    results = json.load(f)
  ood_sets = {'digits_heldout', 'textures', 'photos', 'lfw_faces', 'uniform_noise',
              'gaussian_blobs'}
  scorers = {'mahalanobis_mood', 'msp', 'energy', 'maxlogit'}
  rows = [r for r in results['rows'] if r['ood_set'] in ood_sets]
  assert {(r['scorer'], r['ood_set']) for r in rows} == {(s, o) for s in scorers for o in ood_sets}
  for row in rows:
    for key in ('auroc', 'fpr95', 'aupr_in', 'aupr_out'):
      assert 0.0 <= row[key] <= 1.0, row
  assert 0.0 <= results['id_accuracy']['finetune'] <= 1.0
  assert os.path.exists(os.path.join(workdir, 'results', 'results.csv'))
  assert '| mahalanobis_mood |' in proc.stdout  # the Markdown table is printed
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert {'pretrain', 'finetune'} <= {m['stage'] for m in logged}
  assert all({'loss', 'lr', 'images_per_s'} <= set(m) for m in logged)


def test_finished_stages_are_skipped(smoke_run, data_dir):
  workdir, _ = smoke_run
  proc = _main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
               '--config.stages=pretrain,finetune', data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '[pretrain] skipped' in proc.stderr and '[finetune] skipped' in proc.stderr


def test_one_class_scores_the_pretrained_encoder(tmp_path, data_dir):
  workdir = tmp_path / 'workdir'
  proc = _main('--config=configs/digits.py:oneclass=3,smoke', f'--workdir={workdir}',
               data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'results' / 'results.json') as f:
    results = json.load(f)
  assert {(r['model'], r['scorer']) for r in results['rows']} == {('pretrain', 'mahalanobis_mood')}
  assert results['id_accuracy'] == {}  # no classifier head was trained
  assert not (workdir / 'ckpt' / 'finetune').exists()


@pytest.mark.parametrize('args,message', [
    (['--config.finetune.no_such_field=1'], 'no_such_field'),
    (['--config.stages=pretrain,tune'], "unknown stage 'tune': valid choices are pretrain"),
    (['--config.model.variant=XL/16'], 'unknown model variant'),
    (['--config.evaluate.scorers=msp,nope'], "unknown scorer 'nope'"),
    (['--config.data.ood_sets=moon', '--config.data.ood_sets=photos'], 'moon'),
    (['--config.stages=finetune', '--config.data.id_classes=(3,)'], 'one-class'),
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

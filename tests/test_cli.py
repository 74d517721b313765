"""The command line end to end on the smoke config, and its answers to bad input."""

import json
import os
import shutil
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
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert {m['stage'] for m in logged} == {'pretrain', 'finetune', 'logit_ft'}
  steps = [m for m in logged if m['step'] > 0]
  assert all({'loss', 'lr', 'images_per_s'} <= set(m) for m in steps)
  # The default logit_ft loss drops the 10% most mask-sensitive samples: 2 of 16.
  assert all(m['masked_fraction'] == 0.125 for m in steps if m['stage'] == 'logit_ft')


def test_finished_stages_are_skipped(smoke_run, data_dir):
  workdir, _ = smoke_run
  proc = _main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
               '--config.stages=pretrain,finetune,logit_ft', data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ('pretrain', 'finetune', 'logit_ft'):
    assert f'[{stage}] skipped' in proc.stderr


def test_logit_ft_flooding_umap_teacher(smoke_run, data_dir, tmp_path):
  """UM's flooding with UMAP scores + weights and logits-based targets, together."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(smoke_run[0], workdir,
                  ignore=shutil.ignore_patterns('logit_ft*', 'results', 'metrics.jsonl'))
  proc = _main('--config=configs/digits.py:split,smoke', f'--workdir={workdir}',
               '--config.stages=logit_ft,evaluate', '--config.evaluate.models=logit_ft',
               '--config.evaluate.scorers=msp', '--config.logit_ft.loss=um',
               '--config.logit_ft.umap=both', '--config.logit_ft.teacher_alpha=0.9',
               data_dir=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  # The UM constraint is explicit: gamma is logged and saved, flooding is tracked.
  gamma, = [m['gamma'] for m in logged if m['step'] == 0]
  with open(workdir / 'logit_ft_gamma.json') as f:
    assert json.load(f)['gamma'] == gamma > 0
  assert all(0 <= m['flooded'] <= 1 for m in logged if m['step'] > 0)
  assert os.listdir(workdir / 'ckpt' / 'logit_ft' / '4' / 'state')
  with open(workdir / 'results' / 'results.json') as f:
    assert {r['model'] for r in json.load(f)['rows']} == {'logit_ft'}

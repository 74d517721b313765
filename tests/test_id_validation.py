"""With an ID validation split, every validation score and choice reads no test data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mood_jax.ood import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALIDATION_SETS = ('letters', 'digits_heldout_val')


@pytest.fixture(scope='module')
def run(tmp_path_factory, data_dir):
  """configs/digits.py:split,idval,nearval=9 at smoke size, fine-tuned from scratch."""
  workdir = str(tmp_path_factory.mktemp('run') / 'workdir')
  proc = subprocess.run(
      [sys.executable, '-m', 'mood_jax.main',
       '--config=configs/digits.py:split,idval,nearval=9,smoke', f'--workdir={workdir}',
       '--config.stages=finetune,evaluate',
       '--config.finetune.init_from=scratch', '--config.finetune.eval_every=4',
       '--config.evaluate.scorers=msp,knn', '--config.evaluate.detector.write=False',
       f'--config.data.data_dir={data_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'results', 'results.json')) as f:
    results = json.load(f)
  with np.load(os.path.join(workdir, 'results', 'scores.npz')) as npz:
    scores = dict(npz)
  return workdir, results, scores


def test_validation_aurocs_are_scored_against_id_val_and_say_so(run):
  workdir, results, scores = run
  for row in results['rows']:
    if row['ood_set'].endswith('_mean'):
      continue
    id_set = 'id_val' if row['ood_set'] in VALIDATION_SETS else 'id'
    assert row.get('id_set', 'id') == ('id_val' if id_set == 'id_val' else 'id')
    prefix = f'{row["model"]}/{row["scorer"]}/'
    expected = metrics.ood_metrics(scores[prefix + id_set], scores[prefix + row['ood_set']])
    assert row['auroc'] == pytest.approx(float(expected['auroc']))
  groups = {row['ood_set']: row['ood_group'] for row in results['rows']}
  assert groups['digits_heldout_val'] == groups['letters'] == 'validation'
  assert groups['digits_heldout'] == 'near'
  # The ID validation examples are none of the ID test ones: they are ID train rows.
  assert len(scores['ids/id_val']) == len(scores['finetune/msp/id_val']) > 0
  with open(os.path.join(workdir, 'results', 'results.md')) as f:
    text = f.read()
  assert '| validation AUROC (vs id_val) |' in text and '| letters (vs id_val) |' in text


def test_sweeps_fit_on_id_train_and_choose_on_id_val(run):
  _, results, scores = run
  sweep = results['sweeps']['finetune']['knn']
  assert sweep['id_set'] == 'id_val'
  assert sweep['ood_sets'] == list(VALIDATION_SETS)
  assert sweep['id_validation_examples'] == len(scores['ids/id_val'])


def test_eval_during_training_reads_id_val_not_the_test_split(run, tensorboard_steps):
  workdir, _, _ = run
  tags = tensorboard_steps(os.path.join(workdir, 'tensorboard', 'finetune'))
  assert tags['eval/id_val_accuracy'] == tags['eval/msp_auroc_letters_vs_id_val'] == [4]
  assert 'eval/id_accuracy' not in tags and 'eval/msp_auroc_letters' not in tags

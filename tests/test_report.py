"""Result files: schema, near/far means, Markdown contents, plots, no leftovers."""

import csv
import json
import os

import numpy as np
import pytest

from mood_jax.ood import report


def _row(model, scorer, ood_set, group, auroc):
  return {'model': model, 'scorer': scorer, 'ood_set': ood_set, 'ood_group': group,
          'auroc': auroc, 'fpr95': 1 - auroc, 'fpr95_id': 0.5, 'aupr_in': auroc,
          'aupr_out': 0.25}


ROWS = [
    _row('finetune', 'msp', 'cifar100', 'near', 0.9),
    _row('finetune', 'msp', 'tin', 'near', 0.8),
    _row('finetune', 'msp', 'svhn', 'far', 0.99),
    _row('pretrain', 'mahalanobis_mood', 'svhn', 'far', 0.95),
]


def test_summarize_adds_mean_rows_for_present_groups_only():
  summary = report.summarize(ROWS)
  means = {(r['model'], r['scorer'], r['ood_set']): r for r in summary
           if r['ood_set'].endswith('_mean')}
  assert set(means) == {('finetune', 'msp', 'near_mean'), ('finetune', 'msp', 'far_mean'),
                        ('pretrain', 'mahalanobis_mood', 'far_mean')}
  near = means['finetune', 'msp', 'near_mean']
  assert near['ood_group'] == 'near'
  assert near['auroc'] == pytest.approx(0.85)
  assert near['fpr95'] == pytest.approx(0.15)
  assert means['finetune', 'msp', 'far_mean']['auroc'] == pytest.approx(0.99)
  assert [r for r in summary if not r['ood_set'].endswith('_mean')] == ROWS


def test_write_results_files(tmp_path):
  results_dir = str(tmp_path / 'results')
  rows = report.summarize(ROWS)
  scores = {'finetune': {'msp': {'id': np.arange(5.), 'svhn': np.arange(3.)}}}
  table = report.write_results(results_dir, rows, {'finetune': 0.9712}, scores=scores)

  assert sorted(os.listdir(results_dir)) == ['results.csv', 'results.json', 'results.md',
                                             'scores.npz']  # no temporary files left
  with open(os.path.join(results_dir, 'results.json')) as f:
    document = json.load(f)
  assert set(document) == {'conventions', 'id_accuracy', 'rows', 'hparams', 'sweeps',
                           'changed_settings'}
  assert 'OOD positive' in document['conventions']['fpr95']
  assert 'ID positive' in document['conventions']['fpr95_id']
  assert document['id_accuracy'] == {'finetune': 0.9712}
  assert document['rows'] == rows

  with open(os.path.join(results_dir, 'results.csv')) as f:
    lines = list(csv.DictReader(f))
  assert len(lines) == len(rows)
  assert float(lines[0]['auroc']) == 0.9 and lines[0]['ood_set'] == 'cifar100'

  with open(os.path.join(results_dir, 'results.md')) as f:
    assert f.read() == table
  with np.load(os.path.join(results_dir, 'scores.npz')) as saved:
    np.testing.assert_array_equal(saved['finetune/msp/svhn'], np.arange(3.))


def test_markdown_table_has_every_row_in_percent():
  table = report.markdown_table(report.summarize(ROWS), {'finetune': 0.9712})
  assert '| model | scorer | OOD set | AUROC | FPR@95 | AUPR-In | AUPR-Out |' in table
  assert '| finetune | msp | cifar100 | 90.00 | 10.00 | 90.00 | 25.00 |' in table
  assert '| finetune | msp | near_mean | 85.00 | 15.00 | 85.00 | 25.00 |' in table
  assert '| pretrain | mahalanobis_mood | svhn | 95.00 | 5.00 | 95.00 | 25.00 |' in table
  assert 'ID accuracy: finetune 97.12%' in table
  assert 'OpenOOD' in table


def test_plot_scores_writes_histogram_and_roc_per_model_and_scorer(tmp_path):
  rng = np.random.default_rng(0)
  by_set = {'id': rng.normal(1, 1, 100), 'svhn': rng.normal(0, 1, 80),
            'tin': rng.normal(0.5, 1, 60)}
  scores = {'finetune': {'msp': by_set, 'energy': by_set}}
  paths = report.plot_scores(str(tmp_path), scores)
  expected = {f'finetune_{scorer}_{kind}.png' for scorer in ('msp', 'energy')
              for kind in ('hist', 'roc')}
  assert {os.path.basename(p) for p in paths} == expected
  assert set(os.listdir(tmp_path / 'plots')) == expected
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_histogram_bins_distance_scores_on_a_log_axis_so_id_and_ood_both_show():
  rng = np.random.default_rng(0)
  distances = {'id': -rng.uniform(30, 300, 200), 'far': -rng.uniform(1e3, 1e4, 200)}
  axes = report._histogram_figure('mahalanobis', distances).axes[0]
  assert axes.get_xscale() == 'symlog'
  # Every set fills several bars, and each set's bars sum to one (fractions of the set).
  for bars in axes.containers:
    heights = np.array([bar.get_height() for bar in bars])
    assert (heights > 0).sum() >= 5 and np.isclose(heights.sum(), 1)
  logits = {'id': rng.normal(1, 1, 100), 'far': rng.normal(0, 1, 80)}
  assert report._histogram_figure('msp', logits).axes[0].get_xscale() == 'linear'

"""Result files: schema, near/far means, Markdown contents, plots, no leftovers."""

import csv
import json
import os

import numpy as np
import pytest

from mood_jax.ood import metrics, report


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
                           'models', 'changed_settings', 'preprocessing', 'compute'}
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


def _table(text: str, title: str) -> list[list[str]]:
  """The cells of the Markdown table that follows `title` in `text`."""
  lines = text[text.index(title):].splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('|'))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      return rows
    rows.append([cell.strip() for cell in line.strip('|').split('|')])
  return rows


def test_headline_has_one_row_per_model_and_scorer_ranked_by_validation():
  rows = [*ROWS, _row('finetune', 'msp', 'letters', 'validation', 0.6),
          _row('finetune', 'energy', 'svhn', 'far', 0.97),
          _row('finetune', 'energy', 'letters', 'validation', 0.8)]
  text = report.markdown_table(report.summarize(rows), {'finetune': 0.9712})
  assert text.startswith('## Headline')
  header = text[text.index('| rank'):].splitlines()[0]
  assert header == ('| rank | model | scorer | near AUROC | near FPR@95 | far AUROC | '
                    'far FPR@95 | ID acc. | validation AUROC (vs id_test) |')
  # Best validation AUROC first; a pair without validation sets last.
  assert _table(text, '## Headline') == [
      ['1', 'finetune', 'energy', '', '', '97.00', '3.00', '97.12', '80.00'],
      ['2', 'finetune', 'msp', '85.00', '15.00', '99.00', '1.00', '97.12', '60.00'],
      ['3', 'pretrain', 'mahalanobis_mood', '', '', '95.00', '5.00', '', '']]
  # Without validation sets: evaluation order, no rank.
  text = report.markdown_table(report.summarize(ROWS), {'finetune': 0.9712})
  assert text[text.index('## Headline'):].split('| model')[0].count('| rank') == 0


def test_per_set_tables_group_each_set_validation_near_far():
  rows = [*ROWS, _row('finetune', 'msp', 'letters', 'validation', 0.6)]
  text = report.markdown_table(report.summarize(rows), {'finetune': 0.9712})
  table = _table(text, '### finetune / msp')
  assert [cells[:2] for cells in table] == [
      ['validation', 'letters (vs id_test)'], ['near', 'cifar100'], ['near', 'tin'],
      ['near', '**mean**'], ['far', 'svhn'], ['far', '**mean**']]
  # Every metric the rows carry is a column, in percent: none is left out by a fixed list.
  assert table[1] == ['near', 'cifar100', '90.00', '10.00', '50.00', '90.00', '25.00']
  assert _table(text, '### pretrain / mahalanobis_mood') == [
      ['far', 'svhn', '95.00', '5.00', '50.00', '95.00', '25.00'],
      ['far', '**mean**', '95.00', '5.00', '50.00', '95.00', '25.00']]
  renamed = [{**{k: v for k, v in row.items() if k != 'aupr_in'}, 'aupr_id': 0.5}
             for row in ROWS]
  assert '| group | OOD set | AUROC | FPR@95 | FPR@95 (ID+) | AUPR-Out | aupr_id |' in (
      report.markdown_table(renamed, {}))
  sorted_keys = [dict(sorted(row.items())) for row in ROWS]  # as jitted metrics come back
  assert '| group | OOD set | AUROC | FPR@95 | FPR@95 (ID+) | AUPR-In | AUPR-Out |' in (
      report.markdown_table(sorted_keys, {}))
  assert 'OpenOOD' in text


def test_tables_say_which_id_set_the_validation_aurocs_used():
  rows = [*ROWS, {**_row('finetune', 'msp', 'letters', 'validation', 0.6), 'id_set': 'id_val'}]
  text = report.markdown_table(report.summarize(rows), {'finetune': 0.9712})
  assert text[text.index('| model'):].splitlines()[0].endswith('| validation AUROC (vs id_val) |')
  assert _table(text, '### finetune / msp')[0][:3] == ['validation', 'letters (vs id_val)', '60.00']


def test_markdown_table_says_how_models_were_trained_only_when_given():
  assert 'Models:' not in report.markdown_table(report.summarize(ROWS), {'finetune': 0.9712})
  table = report.markdown_table(report.summarize(ROWS), {'finetune': 0.9712},
                                models={'logit_ft': 'loss=um (flooding)'})
  assert 'Models:\n- logit_ft: loss=um (flooding)\n' in table


def test_plot_scores_writes_histogram_and_roc_per_model_and_scorer(tmp_path):
  rng = np.random.default_rng(0)
  by_set = {'id': rng.normal(1, 1, 100), 'svhn': rng.normal(0, 1, 80),
            'tin': rng.normal(0.5, 1, 60)}
  scores = {'finetune': {'msp': by_set, 'energy': by_set}}
  paths = report.plot_scores(str(tmp_path), scores, {'svhn': 'far', 'tin': 'near'})
  expected = {f'finetune_{scorer}_{kind}.png' for scorer in ('msp', 'energy')
              for kind in ('hist', 'roc')}
  assert {os.path.basename(p) for p in paths} == expected
  assert set(os.listdir(tmp_path / 'plots')) == expected
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_image_grids_show_id_scored_most_ood_and_ood_scored_most_id(tmp_path):
  """Each grid asks for the ID test images with the lowest scores and each OOD set's with
  the highest, worst first; the ID validation scores are not shown."""
  rng = np.random.default_rng(0)
  by_set = {'id': rng.permutation(20).astype(float), 'id_val': rng.normal(size=5),
            'svhn': rng.permutation(12).astype(float), 'tin': np.zeros(6)}
  asked = {}

  def images(name, positions):
    asked[name] = list(positions)
    return [np.full((4, 4, 1), 10 * p, np.uint8) for p in positions]

  paths = report.plot_extremes(str(tmp_path), {'finetune': {'msp': by_set}}, images,
                               {'svhn': 'far', 'tin': 'near'}, count=3)
  assert [os.path.basename(p) for p in paths] == ['finetune_msp_extremes.png']
  assert asked == {'id': list(np.argsort(by_set['id'])[:3]),
                   'svhn': list(np.argsort(-by_set['svhn'])[:3]),
                   'tin': [0, 1, 2]}  # ties: in set order
  with open(paths[0], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_histogram_bins_distance_scores_on_a_log_axis_so_id_and_ood_both_show():
  rng = np.random.default_rng(0)
  distances = {'id': -rng.uniform(30, 300, 200), 'far': -rng.uniform(1e3, 1e4, 200)}
  _, heights, symlog = report.histograms(distances)
  assert symlog
  # Every set fills several bars, and each set's bars sum to one (fractions of the set).
  for bars in heights.values():
    assert (bars > 0).sum() >= 5 and np.isclose(bars.sum(), 1)
  assert report.histogram_figure('mahalanobis', distances).axes[0].get_xscale() == 'symlog'
  logits = {'id': rng.normal(1, 1, 100), 'far': rng.normal(0, 1, 80)}
  assert not report.histograms(logits)[2]


def test_histogram_draws_id_filled_and_a_panel_per_group_when_sets_crowd():
  rng = np.random.default_rng(0)
  by_set = {'id': rng.normal(1, 1, 100), **{f'far{i}': rng.normal(0, 1, 50) for i in range(4)},
            'near0': rng.normal(0.5, 1, 50), 'letters': rng.normal(0, 1, 50)}
  groups = {'near0': 'near', 'letters': 'validation', **{f'far{i}': 'far' for i in range(4)}}
  figure = report.histogram_figure('msp', by_set, groups)
  assert [axes.get_title() for axes in figure.axes] == [
      'msp: validation', 'msp: near', 'msp: far']
  for axes in figure.axes:
    id_patch = axes.patches[0]
    assert id_patch.get_label() == 'ID (test)' and id_patch.get_fill()
    assert not any(patch.get_fill() for patch in axes.patches[1:])
  assert [patch.get_label() for patch in figure.axes[2].patches[1:]] == [
      'far0', 'far1', 'far2', 'far3']
  few = {name: by_set[name] for name in ('id', 'far0', 'near0')}
  assert len(report.histogram_figure('msp', few, groups).axes) == 1  # not crowded


def test_roc_marks_the_fpr95_point_of_each_set():
  rng = np.random.default_rng(0)
  by_set = {'id': rng.normal(2, 1, 400), 'svhn': rng.normal(0, 1, 300)}
  axes = report.roc_figure('msp', by_set).axes[0]
  fpr95 = float(metrics.ood_metrics(by_set['id'], by_set['svhn'])['fpr95'])
  markers = [line for line in axes.lines if line.get_marker() == 'o']
  assert len(markers) == 1
  assert markers[0].get_xydata().tolist() == [[0.05, pytest.approx(1 - fpr95)]]
  assert f'FPR@95 {100 * fpr95:.2f}' in axes.get_legend().get_texts()[0].get_text()

"""The digits study: its statistics, its seed rule, and the smoke grid end to end, whose
document must be a function of the study's CSV alone."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from benchmarks import digits_study, study_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_welch_difference_interval_and_t_match_scipy():
  a, b = [0.91, 0.95, 0.93, 0.96, 0.94], [0.88, 0.90, 0.86]
  test = digits_study.welch(a, b)
  reference = stats.ttest_ind(a, b, equal_var=False)
  np.testing.assert_allclose(test['diff'], np.mean(a) - np.mean(b))
  np.testing.assert_allclose(test['t'], reference.statistic)
  np.testing.assert_allclose(test['df'], reference.df)
  low, high = reference.confidence_interval(0.95)
  np.testing.assert_allclose((test['low'], test['high']), (low, high))
  assert digits_study.verdict(test).startswith('yes')
  assert digits_study.verdict(digits_study.welch(b, a)).startswith('no')
  assert digits_study.verdict(digits_study.welch(a, a[::-1])).startswith('not')
  assert digits_study.mean_std([0.7]) == (0.7, 0.0)
  np.testing.assert_allclose(digits_study.mean_std([0.8, 0.9, 1.0]), (0.9, 0.1))  # ddof=1


def test_paired_difference_interval_and_t_match_scipy():
  a, b = [0.91, 0.95, 0.93, 0.96, 0.94], [0.88, 0.94, 0.90, 0.93, 0.95]
  test = digits_study.paired(a, b)
  reference = stats.ttest_rel(a, b)
  np.testing.assert_allclose(test['diff'], np.mean(a) - np.mean(b))
  np.testing.assert_allclose((test['t'], test['df']), (reference.statistic, reference.df))
  np.testing.assert_allclose((test['low'], test['high']), reference.confidence_interval(0.95))
  with pytest.raises(ValueError, match='same seeds'):
    digits_study.paired(a, b[:3])


def test_um_variants_are_compared_seed_by_seed_and_mim_cells_as_independent_runs():
  cells = {'um_base': digits_study.Cell('um_base', 'um', ()),
           'mae': digits_study.Cell('mae', 'mim', ()),
           'scratch1000': digits_study.Cell('scratch1000', 'mim', ()),
           **{name: digits_study.Cell(name, 'um', (), 'logit_ft', 'um_base')
              for name in ('um_ce', 'um_flood')}}
  comparison = digits_study.Comparison
  assert digits_study.shares_checkpoints(cells, comparison('um_flood', 'um_ce', 'steps', 'um'))
  assert digits_study.shares_checkpoints(cells, comparison('um_ce', 'um_base', 'unmatched', 'um'))
  assert not digits_study.shares_checkpoints(
      cells, comparison('mae', 'scratch1000', 'steps', 'mim'))
  # A shift shared by every seed pair: the paired interval sees it, Welch's is lost in the
  # spread between seeds.
  ce, flood = [0.70, 0.80, 0.90, 0.75], [0.71, 0.82, 0.91, 0.77]
  rows = [*_rows('um_ce', 'logit_ft', ce), *_rows('um_flood', 'logit_ft', flood)]
  test = digits_study.compare(rows, cells, comparison('um_flood', 'um_ce', 'steps', 'um'))
  assert test['test'] == 'paired' and test['low'] > 0
  assert digits_study.welch(flood, ce)['low'] < 0


def test_the_plain_answer_counts_intervals_and_says_when_the_premise_fails():
  comparisons = [digits_study.Comparison(f'cell{i}', 'control', 'steps', 'um') for i in range(4)]
  intervals = [(0.02, 0.01, 0.03), (0.01, -0.01, 0.03), (-0.01, -0.03, 0.01), (0.0, -0.1, 0.1)]
  tests = {c: dict(diff=d, low=lo, high=hi) for c, (d, lo, hi) in zip(comparisons, intervals)}
  answer = digits_study.plain_answer(tests, comparisons, 'losses')
  assert answer.startswith('**Answer: in part.** Of the 4 losses, 1 have a 95% interval above '
                           'zero, 0 below zero and 3 contain it (cell0 vs control (steps) +2.00')
  assert '2 of the 4 differences are positive' in answer
  assert 'about 0.2 of 4 intervals' in answer
  assert 'Answer: yes.' in digits_study.plain_answer(tests, comparisons[:1], 'x')
  assert 'Answer: not shown.' in digits_study.plain_answer(tests, comparisons[1:], 'x')
  tests[comparisons[3]].update(diff=-0.05, low=-0.08, high=-0.02)
  assert 'Answer: mixed.' in digits_study.plain_answer(tests, comparisons, 'x')
  assert 'Answer: no, worse.' in digits_study.plain_answer(tests, comparisons[3:], 'x')
  assert digits_study.plain_answer(tests, comparisons, 'x', premise=False).startswith(
      "UM's premise does not hold in this run, so this does not test UM's claim.")


def _curve(ce, auroc_by_step):
  """um_base's curve rows: train_ce at step 100 (2 seeds), validation AUROC per step."""
  rows = [dict(cell='um_base', seed=seed, model='finetune', scorer='', set='id_train',
               metric='train_ce', step=100, value=ce) for seed in (0, 1)]
  rows += [dict(cell='um_base', seed=seed, model='finetune', scorer='', set='id_train',
                metric=metric, step=100, value=value) for seed in (0, 1)
           for metric, value in (('memorised', 1.0), ('atypical', 3))]
  for step, aurocs in auroc_by_step.items():
    rows += [dict(cell='um_base', seed=seed, model='finetune', scorer=digits_study.RANK_SCORER,
                  set=digits_study.VALIDATION, metric='validation_auroc', step=step,
                  value=value) for seed, value in enumerate(aurocs)]
  return rows


def test_the_premise_says_whether_validation_auroc_drops_after_its_peak():
  assert digits_study.premise_holds([]) is None
  assert not digits_study.premise_holds(_curve(0.5, {}))
  rows = _curve(0.001, {50: [0.90, 0.92], 100: [0.85, 0.86]})
  assert digits_study.premise_holds(rows)
  (text, _) = digits_study._premise(rows)
  assert 'clean training CE below 0.05) holds' in text
  drop = digits_study.paired([0.90, 0.92], [0.85, 0.86])
  assert (f'peaks at step 50 (91.00) and ends at 85.50 (step 100): peak − end, seed by seed, '
          f'+5.50 points [{100 * drop["low"]:+.2f}, {100 * drop["high"]:+.2f}]') in text
  (text, _) = digits_study._premise(_curve(0.001, {50: [0.80, 0.82], 100: [0.85, 0.86]}))
  assert 'is highest at the last evaluation (step 100, 85.5)' in text


def _rows(cell, model, aurocs):
  scorer, ood_set, metric = digits_study.claim_metric('um')
  return [dict(cell=cell, seed=seed, model=model, scorer=scorer, set=ood_set, metric=metric,
               step='', value=value) for seed, value in enumerate(aurocs)]


def test_more_seeds_for_differences_under_two_seed_stds_and_their_base_runs():
  cells = {name: digits_study.Cell(name, 'um', (), 'logit_ft', 'um_base')
           for name in ('um_ce', 'um_flood', 'um_umap')}
  rows = [*_rows('um_ce', 'logit_ft', [0.80, 0.82, 0.81]),
          *_rows('um_flood', 'logit_ft', [0.81, 0.85, 0.83]),   # +0.02, stds 0.02: close
          *_rows('um_umap', 'logit_ft', [0.90, 0.91, 0.92])]    # +0.10: clear
  comparisons = [digits_study.Comparison(name, 'um_ce', 'steps', 'um')
                 for name in ('um_flood', 'um_umap')]
  assert digits_study.needs_more_seeds(rows, cells, comparisons) == {
      'um_ce', 'um_flood', 'um_base'}


def _results_json(path, auroc):
  """A run's results.json with the fields the study reads."""
  path.parent.mkdir(parents=True)
  rows = [dict(model='finetune', scorer='msp', ood_set=name, ood_group=group, auroc=auroc,
               fpr95=0.5) for name, group in (('letters', 'validation'), ('near_mean', 'near'))]
  path.write_text(json.dumps({'rows': rows, 'id_accuracy': {'finetune': 0.9}}))


def test_a_run_with_a_record_is_kept_and_one_with_results_gets_its_record(tmp_path, capsys):
  """The record is what makes a run finished (the study resumes anywhere from records); a
  run that finished without writing one (a worker stopped in between) is not run again."""
  cell, out, records = digits_study.Cell('mae', 'mim', ()), tmp_path / 'out', tmp_path / 'rec'
  directory = out / 'mae' / 'seed0'
  _results_json(directory / 'results' / 'results.json', 0.75)
  (directory / 'study_run.json').write_text(json.dumps(
      {'commit': 'abc1234', 'seconds': 12.5, 'machine': 'x86_64, 2 cores'}))
  digits_study.run_cell(cell, 0, str(out), str(records), smoke=True)  # no data: cannot run
  record = digits_study.read_record(str(records), 'mae', 0)
  assert (record['commit'], record['seconds']) == ('abc1234', 12.5)
  assert record['rows'] == digits_study.results_rows(cell, 0, str(out))
  assert digits_study.values(record['rows'], 'mae', scorer='msp', set=digits_study.VALIDATION,
                             metric='auroc') == [0.75]
  capsys.readouterr()
  (directory / 'results' / 'results.json').unlink()  # would now fail to run: no data
  digits_study.run_cell(cell, 0, str(out), str(records), smoke=True)
  assert 'done before, kept' in capsys.readouterr().out


def test_worker_shares_hold_every_run_once_and_keep_um_variants_after_their_base():
  sizes = digits_study.FULL
  names = ['scratch400', 'mae', 'mae_steps1200', 'scratch1600', 'um_base', 'um_ce', 'um_flood']
  cells = {name: digits_study.cell_named(name, sizes) for name in names}
  runs = [(name, seed) for name in names for seed in (0, 1)]
  split = digits_study.shares(runs, cells, 2, smoke=False)
  assert sorted(run for share in split for run in share) == sorted(runs)
  for seed in (0, 1):
    chain = [(name, seed) for name in ('um_base', 'um_ce', 'um_flood')]
    assert any([run for run in share if run in chain] == chain for share in split)
  # Without their base (it finished), a seed's variants still share a worker: they copy, or
  # redo, the same base checkpoints.
  variants = [('um_ce', 1), ('um_flood', 1), ('um_ce', 0)]
  assert sorted(digits_study.shares(variants, cells, 2, smoke=False)) == [
      [('um_ce', 0)], [('um_ce', 1), ('um_flood', 1)]]


@pytest.fixture(scope='module')
def smoke_study(tmp_path_factory):
  out = tmp_path_factory.mktemp('study')
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.digits_study', '--smoke',
                         f'--out={out}', '--workers=2'],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / 'records' / 'study.json') as f:
    meta = json.load(f)
  return out, meta


def _table_cell(text: str, row: str, column: str) -> str:
  """The cell under `column` of the first Markdown table row that starts with `row`."""
  header = []
  for line in text.splitlines():
    cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
    if column in cells:
      header = cells
    elif header and cells[0] == row:
      return cells[header.index(column)]
  raise AssertionError(f'no {row} / {column} in the document')


@pytest.mark.slow  # the smoke grid: about 3 CPU-minutes of runs
def test_smoke_grid_matches_compute_and_keeps_test_data_out_of_choices(smoke_study):
  out, meta = smoke_study
  costs = meta['costs']
  matched = {(c['cell'], c['matched']): c['control'] for c in meta['comparisons']}
  sizes = digits_study.SMOKE
  mae_steps = sizes.pretrain[1] + sizes.finetune
  assert costs['mae'][0] == mae_steps and matched[('mae', 'steps')] == f'scratch{mae_steps}'
  assert costs[matched[('mae', 'steps')]][0] == mae_steps
  # FLOP-matched: the scratch steps whose FLOPs come nearest mae's pretrain + finetune.
  flops_control = matched[('mae', 'flops')]
  per_step = costs[f'scratch{mae_steps}'][1] / mae_steps
  assert costs[flops_control][0] == round(costs['mae'][1] / per_step)
  assert costs['mae'][1] < mae_steps * per_step  # a masked pretraining step costs less
  # Every validation score (the ranking's) is against id_val, and the CSV's validation mean
  # is the mean of those rows.
  with open(out / 'mae' / 'seed0' / 'results' / 'results.json') as f:
    results = json.load(f)
  validation = [r for r in results['rows'] if r['ood_group'] == 'validation'
                and r['scorer'] == digits_study.RANK_SCORER]
  assert {r['ood_set'] for r in validation} == {'letters', 'digits_heldout_val'}
  assert all(r['id_set'] == 'id_val' for r in validation)
  rows = digits_study.read_csv(out / 'records' / 'study.csv')
  np.testing.assert_allclose(
      digits_study.values(rows, 'mae', model='finetune', scorer=digits_study.RANK_SCORER,
                          set=digits_study.VALIDATION, metric='auroc')[0],
      np.mean([r['auroc'] for r in validation]))


@pytest.mark.slow  # the smoke grid: about 3 CPU-minutes of runs
def test_um_variants_continue_the_same_checkpoint_and_the_curve_is_recorded(smoke_study):
  out, _ = smoke_study
  for seed in (0, 1):
    scores = {}
    for cell in ('um_base', 'um_ce', 'um_flood'):
      with open(out / cell / f'seed{seed}' / 'results' / 'results.json') as f:
        scores[cell] = [r['auroc'] for r in json.load(f)['rows'] if r['model'] == 'finetune']
    assert scores['um_base'] == scores['um_ce'] == scores['um_flood']
  rows = digits_study.read_csv(out / 'records' / 'study.csv')
  sizes = digits_study.SMOKE
  every = sizes.checkpoint_every
  checkpoints = list(range(every, sizes.long_finetune + 1, every))
  assert digits_study._steps(rows, 'um_base', 'train_ce') == checkpoints
  for seed in (0, 1):
    accuracy = [digits_study.values(rows, 'um_base', seed=seed, metric='train_accuracy',
                                    step=step)[0] for step in checkpoints]
    memorised = [digits_study.values(rows, 'um_base', seed=seed, metric='memorised',
                                     step=step)[0] for step in checkpoints]
    # Atypical: what the first checkpoint at TYPICAL_ACCURACY (else the last) gets wrong.
    reference = next((i for i, a in enumerate(accuracy)
                      if a >= digits_study.TYPICAL_ACCURACY), len(checkpoints) - 1)
    assert np.all(np.isnan(memorised[:reference])) and memorised[reference] == 0
  # And validation AUROC (vs id_val) along the way, from evaluation during training.
  evals = list(range(sizes.eval_every, sizes.long_finetune + 1, sizes.eval_every))
  assert digits_study._steps(rows, 'um_base', 'validation_auroc') == evals
  for step in evals:
    assert len(digits_study.values(rows, 'um_base', metric='validation_auroc', step=step)) == 2


@pytest.mark.slow  # the smoke grid: about 3 CPU-minutes of runs
def test_the_document_is_generated_from_the_csv(smoke_study):
  out, meta = smoke_study
  text = (out / 'results_digits.md').read_text()
  assert text == digits_study.render(digits_study.read_csv(out / 'records' / 'study.csv'), meta)
  column = 'mahalanobis_mood near AUROC'
  rows = digits_study.read_csv(out / 'records' / 'study.csv')
  mae = digits_study.values(rows, 'mae', model='finetune', scorer='mahalanobis_mood',
                            set='near_mean', metric='auroc')
  assert _table_cell(text, 'mae', column) == digits_study.pm(mae)
  # Change the CSV: the table and the prose's verdict change with it.
  changed = [{**row, 'value': 0.5 * row['value']} if row['cell'] == 'mae' else row
             for row in rows]
  path = out / 'changed.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, study_records.CSV_FIELDS)
    writer.writeheader()
    writer.writerows(changed)
  again = digits_study.render(digits_study.read_csv(path), meta)
  assert _table_cell(again, 'mae', column) == digits_study.pm(0.5 * mae)
  steps_test = digits_study.welch(
      0.5 * mae, digits_study.values(rows, meta_control(meta, 'steps'), model='finetune',
                                     scorer='mahalanobis_mood', set='near_mean', metric='auroc'))
  assert f'{100 * steps_test["diff"]:+.1f} points' in again
  assert 'no, worse' in again


def meta_control(meta, matched):
  return next(c['control'] for c in meta['comparisons']
              if c['cell'] == 'mae' and c['matched'] == matched)

"""The ablation's bookkeeping: finished runs are kept, seeds aggregate to mean ± sample std."""

import json
import os

import numpy as np

from benchmarks import digits_study


def _write_results(workdir, auroc: float, accuracy: float) -> None:
  os.makedirs(os.path.join(workdir, 'results'))
  rows = [{'model': 'finetune', 'scorer': 'msp', 'ood_set': name, 'ood_group': 'near',
           'auroc': auroc, 'fpr95': 1 - auroc, 'fpr95_id': 0.5, 'aupr_in': 0.5,
           'aupr_out': 0.5} for name in ('digits_heldout', 'near_mean')]
  with open(os.path.join(workdir, 'results', 'results.json'), 'w') as f:
    json.dump({'rows': rows, 'id_accuracy': {'finetune': accuracy}}, f)


def test_seeds_aggregate_to_mean_and_sample_std(tmp_path):
  for seed, auroc in (('0', 0.8), ('1', 0.9), ('2', 1.0)):
    _write_results(tmp_path / 'mae' / f'seed{seed}', auroc, accuracy=0.5 + 0.1 * int(seed))
  metrics, accuracy = digits_study.collect(str(tmp_path), ['mae'], ['0', '1', '2'])
  np.testing.assert_allclose(metrics[('mae', 'finetune', 'msp', 'near_mean')]['auroc'],
                             [0.8, 0.9, 1.0])
  mean, std = digits_study.mean_std(metrics[('mae', 'finetune', 'msp', 'near_mean')]['auroc'])
  np.testing.assert_allclose((mean, std), (0.9, 0.1))  # ddof=1, as error bars over seeds
  assert digits_study.mean_std([0.7]) == (0.7, 0.0)
  np.testing.assert_allclose(accuracy[('mae', 'finetune')], [0.5, 0.6, 0.7])
  digits_study.write_csv(str(tmp_path / 'study.csv'), metrics)
  lines = (tmp_path / 'study.csv').read_text().splitlines()
  assert lines[0].startswith('cell,model,scorer,ood_set,seeds,auroc_mean,auroc_std')
  assert any(line.startswith('mae,finetune,msp,near_mean,3,0.9') for line in lines)


def test_a_finished_run_is_not_rerun(tmp_path, capsys):
  workdir = tmp_path / 'mae' / 'seed0'
  _write_results(workdir, 0.9, 0.5)
  before = (workdir / 'results' / 'results.json').read_text()
  digits_study.run_cell('mae', 0, str(workdir), str(tmp_path / 'tfds'))  # would fail to run
  assert 'done before, kept' in capsys.readouterr().out
  assert (workdir / 'results' / 'results.json').read_text() == before
  assert not (workdir / 'log.txt').exists()


def test_extreme_cell_plots_go_to_fixed_dirs_that_a_new_ranking_replaces(tmp_path):
  model, scorer, row = digits_study.BEST_BY
  rng = np.random.default_rng(0)
  for cell in ('mae', 'beit'):
    os.makedirs(tmp_path / cell / 'seed0' / 'results')
    np.savez(tmp_path / cell / 'seed0' / 'results' / 'scores.npz',
             **{f'{model}/{scorer}/{name}': rng.normal(size=50) for name in ('id', row)})
  for best, worst in (('mae', 'beit'), ('beit', 'mae')):
    metrics = {(best, model, scorer, row): {'auroc': [0.9]},
               (worst, model, scorer, row): {'auroc': [0.6]}}
    paths = digits_study.plot_extremes(str(tmp_path), metrics, ['mae', 'beit'], '0')
    assert sorted(os.listdir(tmp_path)) == ['beit', 'best_cell', 'mae', 'worst_cell']
    assert all(os.path.exists(path) for path in paths)
    assert {os.path.relpath(path, tmp_path).split(os.sep)[0] for path in paths} == {
        'best_cell', 'worst_cell'}

"""The digits ablation: does masked image modeling (and the logit fine-tune) help OOD detection?

  python -m benchmarks.digits_study --out=workdir/study [--seeds=0,1,2] [--cells=scratch,mae]

Each cell is configs/digits.py:split (ID = digits 0-4; near OOD = digits 5-9; far OOD =
textures, photos, faces, noise, blobs) with a few overrides, run once per seed in its own
workdir, OUT/<cell>/seed<n>, scoring every model (finetune and logit_ft) with every scorer.
Scorer hparams are chosen on the 'letters' validation set (evaluate.sweep), never on a
reported test set. A run whose results.json exists is not rerun; an interrupted one resumes
from its checkpoints. Then it writes:

  OUT/study.md     mean ± std over seeds: headline scorers' near/far AUROC and FPR@95, ID
                   accuracy; the exact command, commit and machine
  OUT/study.csv    every (cell, model, scorer, OOD set) with mean and std of each metric
  OUT/plots/       AUROC against pretraining length
  OUT/best_cell/plots/, OUT/worst_cell/plots/ (study.md names the cells)
                   score histograms and ROC curves of the best and the worst cell, ranked
                   by MOOD's Mahalanobis AUROC (finetune model) on the letters validation
                   set, so the recipe is chosen without looking at a test set

The full grid is 8 cells x 3 seeds of a ~10-minute run: about 4 hours on 2 CPU cores.
"""

import csv
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from mood_jax.ood import report

_OUT = flags.DEFINE_string('out', 'workdir/study', 'Directory of the runs and the tables.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of every cell.')
_CELLS = flags.DEFINE_list('cells', None, 'Cells to run (default: all of CELLS).')
_PRESET = flags.DEFINE_string('preset', 'split', 'configs/digits.py argument; tests add smoke.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cell -> (pretraining steps, for the length plot; --config overrides). 'mae' is the digits
# default: MAE random masking at 75% for 600 steps, mean-pooled fc_norm feature.
CELLS = {
    'scratch': (0, ('--config.stages=finetune,logit_ft,evaluate',
                    '--config.finetune.init_from=scratch')),
    'mae': (600, ()),
    'mae_steps300': (300, ('--config.pretrain.num_steps=300',)),
    'mae_steps1200': (1200, ('--config.pretrain.num_steps=1200',)),
    'mae_mask50': (600, ('--config.pretrain.mask_ratio=0.5',)),
    'mae_mask90': (600, ('--config.pretrain.mask_ratio=0.9',)),
    'beit': (600, ('--config.pretrain.scheme=blockwise', '--config.pretrain.mask_ratio=0.4')),
    'mae_cls': (600, ('--config.model.pool=cls',)),
}
LENGTH_CELLS = ('scratch', 'mae_steps300', 'mae', 'mae_steps1200')
HEADLINE_SCORERS = ('mahalanobis_mood', 'msp', 'energy', 'knn', 'vim')
# Cells are ranked, and a recipe chosen, on the letters validation set: never on a test set.
BEST_BY = ('finetune', 'mahalanobis_mood', 'letters')  # model, scorer, OOD set


def run_cell(cell: str, seed: int, workdir: str, data_dir: str) -> None:
  """One pipeline run; skipped when its results exist."""
  if os.path.exists(os.path.join(workdir, 'results', 'results.json')):
    print(f'{cell} seed {seed}: done before, kept')
    return
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, '-m', 'mood_jax.main', f'--config=configs/digits.py:{_PRESET.value}',
             f'--workdir={workdir}', *CELLS[cell][1], f'--config.seed={seed}',
             '--config.evaluate.scorers=all', '--config.evaluate.plots=False',
             f'--config.data.data_dir={data_dir}']
  start = time.perf_counter()
  with open(os.path.join(workdir, 'log.txt'), 'a') as log:
    subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  print(f'{cell} seed {seed}: {time.perf_counter() - start:.0f} s')


def collect(out: str, cells, seeds) -> tuple[dict, dict]:
  """({(cell, model, scorer, ood_set): {metric: [per seed]}}, {(cell, model): [ID acc]})."""
  metrics, accuracy = {}, {}
  for cell in cells:
    for seed in seeds:
      with open(os.path.join(out, cell, f'seed{seed}', 'results', 'results.json')) as f:
        results = json.load(f)
      for row in results['rows']:
        key = (cell, row['model'], row['scorer'], row['ood_set'])
        for metric in report.METRICS:
          metrics.setdefault(key, {}).setdefault(metric, []).append(row[metric])
      for model, value in results['id_accuracy'].items():
        accuracy.setdefault((cell, model), []).append(value)
  return metrics, accuracy


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one seed)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _pm(values, scale: float = 100.) -> str:
  mean, std = mean_std(values)
  return f'{scale * mean:.1f} ± {scale * std:.1f}'


def summary_table(metrics: dict, accuracy: dict, cells) -> str:
  header = ['cell', 'model', 'ID acc', f'{BEST_BY[1]} {BEST_BY[2]} (validation) AUROC']
  for scorer in HEADLINE_SCORERS:
    header += [f'{scorer} near AUROC', f'{scorer} far AUROC', f'{scorer} near FPR95']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for cell in cells:
    for model in ('finetune', 'logit_ft'):
      if (cell, model) not in accuracy:
        continue
      values = [cell, model, _pm(accuracy[(cell, model)]),
                _pm(metrics[(cell, model, BEST_BY[1], BEST_BY[2])]['auroc'])]
      for scorer in HEADLINE_SCORERS:
        near, far = metrics[(cell, model, scorer, 'near_mean')], metrics[(cell, model, scorer,
                                                                           'far_mean')]
        values += [_pm(near['auroc']), _pm(far['auroc']), _pm(near['fpr95'])]
      lines.append('| ' + ' | '.join(values) + ' |')
  return '\n'.join(lines)


def write_csv(path: str, metrics: dict) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['cell', 'model', 'scorer', 'ood_set', 'seeds',
                     *[f'{m}_{s}' for m in report.METRICS for s in ('mean', 'std')]])
    for key, by_metric in sorted(metrics.items()):
      stats = [v for metric in report.METRICS for v in mean_std(by_metric[metric])]
      writer.writerow([*key, len(by_metric['auroc']), *stats])


def plot_length(path: str, metrics: dict, cells) -> None:
  """Near-, far- and validation-OOD AUROC of MOOD's Mahalanobis (finetune model) by
  pretraining steps."""
  figure = Figure(figsize=(6, 4), layout='constrained')
  axes = figure.subplots()
  cells = [cell for cell in LENGTH_CELLS if cell in cells]
  steps = [CELLS[cell][0] for cell in cells]
  for group, label in (('near_mean', 'near OOD (test)'), ('far_mean', 'far OOD (test)'),
                       (BEST_BY[2], f'{BEST_BY[2]} (validation)')):
    stats = [mean_std(metrics[(cell, 'finetune', 'mahalanobis_mood', group)]['auroc'])
             for cell in cells]
    axes.errorbar(steps, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
                  marker='o', capsize=3, label=label)
  axes.set(xlabel='MIM pretraining steps (0: from scratch)', ylabel='AUROC (%)',
           title='mahalanobis_mood, finetune model, mean ± std over seeds')
  axes.legend()
  figure.savefig(path, dpi=100)


def ranked_cells(metrics: dict, cells) -> list[str]:
  model, scorer, row = BEST_BY
  return sorted(cells, key=lambda cell: mean_std(metrics[(cell, model, scorer, row)]['auroc'])[0])


def plot_extremes(out: str, metrics: dict, cells, seed: str) -> list[str]:
  """Score histograms and ROC curves of the worst and best cells (one seed's scores), in
  worst_cell/ and best_cell/: fixed names, so a report of a new ranking replaces the last's."""
  model, scorer, _ = BEST_BY
  paths = []
  ranked = ranked_cells(metrics, cells)
  for label, cell in (('worst', ranked[0]), ('best', ranked[-1])):
    with np.load(os.path.join(out, cell, f'seed{seed}', 'results', 'scores.npz')) as npz:
      prefix = f'{model}/{scorer}/'
      by_set = {key[len(prefix):]: npz[key] for key in npz.files if key.startswith(prefix)}
    paths += report.plot_scores(os.path.join(out, f'{label}_cell'),
                                {model: {scorer: by_set}})
  return paths


def _commit() -> str:
  return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                        text=True).stdout.strip() or 'unknown'


def write_report(out: str, cells, seeds, wall_s: float) -> str:
  metrics, accuracy = collect(out, cells, seeds)
  os.makedirs(os.path.join(out, 'plots'), exist_ok=True)
  write_csv(os.path.join(out, 'study.csv'), metrics)
  plot_length(os.path.join(out, 'plots', 'auroc_vs_pretraining_steps.png'), metrics, cells)
  plot_extremes(out, metrics, cells, seeds[0])
  ranked = ranked_cells(metrics, cells)
  text = '\n'.join([
      '# Digits ablation', '',
      f'Command: `python -m benchmarks.digits_study --out={out} --seeds={",".join(seeds)} '
      f'--cells={",".join(cells)} --preset={_PRESET.value}`  ',
      f'Commit {_commit()}; {platform.processor() or platform.machine()}, {os.cpu_count()} '
      f'cores; wall time of the runs made now: {wall_s / 60:.0f} min.', '',
      'ID = digits 0-4; near OOD = digits 5-9; far OOD = textures, photos, lfw_faces, '
      'uniform_noise, gaussian_blobs. Scorer hparams chosen on the letters validation set. '
      'Mean ± std over seeds, in %.', '',
      summary_table(metrics, accuracy, cells), '',
      f'Cells by {BEST_BY[2]} (validation) AUROC of {BEST_BY[1]} ({BEST_BY[0]} model), worst '
      f'to best: {", ".join(ranked)}. The recipe chosen on validation: {ranked[-1]}.', '',
      f'Every (cell, model, scorer, OOD set): study.csv. Plots: plots/, best_cell/ '
      f'({ranked[-1]}, seed {seeds[0]}), worst_cell/ ({ranked[0]}, seed {seeds[0]}).', ''])
  with open(os.path.join(out, 'study.md'), 'w') as f:
    f.write(text)
  return text


def main(argv) -> None:
  del argv
  cells = _CELLS.value or list(CELLS)
  unknown = sorted(set(cells) - set(CELLS))
  if unknown:
    sys.exit(f'error: unknown cells {unknown}; valid: {", ".join(CELLS)}')
  out = os.path.abspath(_OUT.value)
  start = time.perf_counter()
  for cell in cells:
    for seed in _SEEDS.value:
      run_cell(cell, int(seed), os.path.join(out, cell, f'seed{seed}'),
               os.path.join(out, 'tfds'))
  print(write_report(out, cells, _SEEDS.value, time.perf_counter() - start))


if __name__ == '__main__':
  app.run(main)

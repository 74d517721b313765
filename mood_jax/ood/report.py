"""Writes OOD results: results.json / .csv / .md, raw scores, score and ROC plots.

Every file is written to a temporary name and moved into place, so a crash never leaves
a half-written file behind.
"""

import csv
import io
import json
import os
import tempfile

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as sk_metrics

METRICS = ('auroc', 'fpr95', 'fpr95_id', 'aupr_in', 'aupr_out')
FIELDS = ('model', 'scorer', 'ood_set', 'ood_group', *METRICS)
GROUPS = ('near', 'far')
CONVENTIONS = {
    'score': 'higher score = more in-distribution',
    'auroc': 'area under the ROC curve, ties as sklearn roc_auc_score',
    'aupr_in': 'average precision, ID positive, ranked by score',
    'aupr_out': 'average precision, OOD positive, ranked by -score',
    'fpr95': 'OpenOOD v1.5 FPR@95 (OOD positive): fraction of ID flagged OOD at the '
             'threshold that catches 95% of OOD',
    'fpr95_id': 'ODIN/MOOD FPR@95 (ID positive): fraction of OOD accepted at the '
                'threshold that accepts 95% of ID',
}
_CONVENTIONS_LINE = ('Conventions: higher score = more ID; AUROC and AUPR-In take ID as '
                     'positive, AUPR-Out OOD; FPR@95 is OpenOOD v1.5\'s (ID flagged OOD '
                     'when 95% of OOD are caught); the ID-positive fpr95_id is in '
                     'results.json/csv.')


def summarize(rows: list[dict]) -> list[dict]:
  """Each (model, scorer)'s rows followed by its near-OOD and far-OOD mean rows."""
  by_pair = {}
  for row in rows:
    by_pair.setdefault((row['model'], row['scorer']), []).append(row)
  summary = []
  for (model, scorer), pair_rows in by_pair.items():
    summary.extend(pair_rows)
    for group in GROUPS:
      members = [row for row in pair_rows if row['ood_group'] == group]
      if members:
        summary.append({'model': model, 'scorer': scorer, 'ood_set': f'{group}_mean',
                        'ood_group': group,
                        **{m: float(np.mean([row[m] for row in members])) for m in METRICS}})
  return summary


def _hparams_lines(hparams: dict, sweeps: dict) -> list[str]:
  """One line per model and scorer that has hparams, saying which were chosen on what."""
  lines = []
  for model, by_scorer in hparams.items():
    for scorer, values in by_scorer.items():
      if not values:
        continue
      line = f'- {model} / {scorer}: ' + ', '.join(f'{k}={v}' for k, v in values.items())
      chosen = sweeps.get(model, {}).get(scorer)
      if chosen:
        line += (f' ({", ".join(chosen["chosen"])} chosen by {chosen["metric"]} on '
                 f'{", ".join(chosen["ood_sets"])} vs {chosen["id_validation_examples"]} '
                 'held-out ID training examples)')
      lines.append(line)
  return ['Scorer hyperparameters:', *lines, ''] if lines else []


def markdown_table(rows: list[dict], id_accuracy: dict[str, float],
                   hparams: dict | None = None, sweeps: dict | None = None) -> str:
  """Percentages with two decimals, then the ID accuracy, hparams and conventions lines."""
  lines = ['| model | scorer | OOD set | AUROC | FPR@95 | AUPR-In | AUPR-Out |',
           '|---|---|---|---:|---:|---:|---:|']
  for row in rows:
    values = ' | '.join(f'{100 * row[m]:.2f}' for m in ('auroc', 'fpr95', 'aupr_in', 'aupr_out'))
    lines.append(f'| {row["model"]} | {row["scorer"]} | {row["ood_set"]} | {values} |')
  accuracies = ', '.join(f'{model} {100 * acc:.2f}%' for model, acc in id_accuracy.items())
  return '\n'.join([*lines, '', f'ID accuracy: {accuracies or "n/a (no classifier head)"}',
                    '', *_hparams_lines(hparams or {}, sweeps or {}), _CONVENTIONS_LINE, ''])


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(path)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp_')  # same filesystem
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would hide results from other users
    os.replace(tmp_path, path)
  except BaseException:
    os.remove(tmp_path)
    raise


def _csv_text(rows: list[dict]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator='\n')
  writer.writeheader()
  writer.writerows({field: row[field] for field in FIELDS} for row in rows)
  return buffer.getvalue()


def _npz_bytes(scores: dict, ids: dict) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **{f'{model}/{scorer}/{dataset}': np.asarray(values)
                      for model, by_scorer in scores.items()
                      for scorer, by_set in by_scorer.items()
                      for dataset, values in by_set.items()},
           **{f'ids/{dataset}': np.asarray(values) for dataset, values in ids.items()})
  return buffer.getvalue()


def write_results(results_dir: str, rows: list[dict], id_accuracy: dict[str, float],
                  scores: dict | None = None, hparams: dict | None = None,
                  sweeps: dict | None = None, ids: dict | None = None) -> str:
  """Writes results.{json,csv,md} (and scores.npz if `scores`); returns the Markdown.

  `scores` is {model: {scorer: {'id': [N], ood_set: [M], ...}}}, stored under keys
  'model/scorer/set' so metrics can be recomputed without re-extracting features; `ids`
  {set: [N]} each example's id, in the same order, under 'ids/set'.
  `hparams` is {model: {scorer: the hparams it ran with}} and `sweeps` {model: {scorer:
  how they were chosen}} (see stages/evaluate.py), both kept in results.json.
  """
  os.makedirs(results_dir, exist_ok=True)
  document = {'conventions': CONVENTIONS, 'id_accuracy': id_accuracy, 'rows': rows,
              'hparams': hparams or {}, 'sweeps': sweeps or {}}
  table = markdown_table(rows, id_accuracy, hparams, sweeps)
  outputs = {'results.json': json.dumps(document, indent=2) + '\n',
             'results.csv': _csv_text(rows), 'results.md': table}
  for name, text in outputs.items():
    _write_atomically(os.path.join(results_dir, name), text.encode())
  if scores is not None:
    _write_atomically(os.path.join(results_dir, 'scores.npz'), _npz_bytes(scores, ids or {}))
  return table


def _save_figure(figure: Figure, path: str) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100)
  _write_atomically(path, buffer.getvalue())


def _histogram_figure(title: str, by_set: dict) -> Figure:
  figure = Figure(figsize=(6, 4), layout='constrained')
  axes = figure.subplots()
  # Shared bins over the central 98% of all scores, so the sets' densities compare bar for
  # bar and a long tail does not squeeze the rest into a few bars; tail values are clipped
  # into the edge bins, not dropped.
  low, high = np.percentile(np.concatenate(list(by_set.values())), [1, 99])
  clipped = {name: np.clip(values, low, high) for name, values in by_set.items()}
  # Distance-like scores (e.g. Mahalanobis: ID tens below 0, far OOD thousands) span decades
  # with one sign: there the bins and the axis are symmetric-log, so ID and OOD both show.
  near, far = sorted((abs(low), abs(high)))
  symlog = low * high > 0 and far > 100 * near
  if symlog:  # 60 bins even in sign(x) log(1 + |x| / near), mapped back to scores
    ends = np.sign([low, high]) * np.log1p(np.abs([low, high]) / near)
    edges = np.linspace(*ends, 61)
    bins = np.sign(edges) * near * np.expm1(np.abs(edges))
    axes.set_xscale('symlog', linthresh=near)
  else:  # the clipped scores span exactly [low, high]
    bins = np.histogram_bin_edges([low, high], bins=60)
  for dataset, values in clipped.items():
    axes.hist(values, bins=bins, density=not symlog, alpha=0.5, label=dataset,
              weights=np.full(len(values), 1 / len(values)) if symlog else None)
  axes.set(title=title, ylabel='fraction of the set' if symlog else 'density',
           xlabel='score (higher = more in-distribution; 1st-99th percentile, tails at edges)')
  axes.legend(fontsize='small')
  return figure


def _roc_figure(title: str, by_set: dict) -> Figure:
  figure = Figure(figsize=(5, 5), layout='constrained')
  axes = figure.subplots()
  id_scores = by_set['id']
  for dataset, ood_scores in by_set.items():
    if dataset == 'id':
      continue
    is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    scores = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = sk_metrics.roc_curve(is_id, scores)
    auroc = sk_metrics.roc_auc_score(is_id, scores)
    axes.plot(fpr, tpr, label=f'{dataset} (AUROC {100 * auroc:.2f})')
  axes.plot([0, 1], [0, 1], 'k:', linewidth=0.8)
  axes.set(title=title, xlabel='OOD accepted as ID (FPR)', ylabel='ID accepted (TPR)')
  axes.legend(loc='lower right')
  return figure


def plot_scores(results_dir: str, scores: dict) -> list[str]:
  """Per (model, scorer): score histograms and ROC curves (ID positive) in plots/.

  `scores` is {model: {scorer: {'id': [N], ood_set: [M], ...}}}. Figures are built
  without pyplot (Agg rendering, nothing kept open); returns the paths written.
  """
  plots_dir = os.path.join(results_dir, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  paths = []
  for model, by_scorer in scores.items():
    for scorer, by_set in by_scorer.items():
      by_set = {name: np.asarray(values, np.float64) for name, values in by_set.items()}
      for kind, make_figure in (('hist', _histogram_figure), ('roc', _roc_figure)):
        path = os.path.join(plots_dir, f'{model}_{scorer}_{kind}.png')
        _save_figure(make_figure(f'{model} / {scorer}', by_set), path)
        paths.append(path)
  return paths

"""Writes OOD results: results.json / .csv / .md, raw scores, score and ROC plots, and grids
of the images a detector gets most wrong.

Every file is written to a temporary name and moved into place, so a crash never leaves
a half-written file behind.
"""

import csv
import io
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from mood_jax import files
from mood_jax.data.sources.source import ID_VAL
from mood_jax.ood import metrics

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
  from matplotlib.figure import Figure

METRICS = ('auroc', 'fpr95', 'fpr95_id', 'aupr_in', 'aupr_out')
FIELDS = ('model', 'scorer', 'ood_set', 'ood_group', *METRICS)
GROUPS = ('near', 'far')
CONVENTIONS = {
    'score': 'higher score = more in-distribution',
    'auroc': 'area under the ROC curve, ties as sklearn roc_auc_score',
    # OpenOOD's openood/evaluators/metrics.py on main at 4a72488 (after the v1.5 tag).
    'aupr_in': 'OpenOOD AUPR-In: trapezoid area under the precision-recall curve, ID '
               'positive, ranked by score',
    'aupr_out': 'OpenOOD AUPR-Out: trapezoid area under the precision-recall curve, OOD '
                'positive, ranked by -score',
    'fpr95': 'OpenOOD FPR@95 (OOD positive): fraction of ID flagged OOD at the '
             'threshold that catches 95% of OOD',
    'fpr95_id': 'MOOD FPR@95 (ID positive): fraction of OOD scoring strictly above the 5th '
                'percentile (linear) of the ID scores',
}
_CONVENTIONS_LINE = ('Conventions: higher score = more ID; AUROC and AUPR-In take ID as '
                     'positive, AUPR-Out OOD; FPR@95 is OpenOOD\'s (ID flagged OOD '
                     'when 95% of OOD are caught); FPR@95 (ID+) is the ODIN/MOOD one (OOD '
                     'accepted when 95% of ID are).')


def _pairs(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
  """Rows by (model, scorer), in order of first appearance."""
  by_pair = {}
  for row in rows:
    by_pair.setdefault((row['model'], row['scorer']), []).append(row)
  return by_pair


def summarize(rows: list[dict]) -> list[dict]:
  """Each (model, scorer)'s rows followed by its near-OOD and far-OOD mean rows."""
  summary = []
  for (model, scorer), pair_rows in _pairs(rows).items():
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
        id_side = ('ID validation (id_val) examples, never trained on' if chosen.get('id_set')
                   else 'held-out ID training examples')
        line += (f' ({", ".join(chosen["chosen"])} chosen by {chosen["metric"]} on '
                 f'{", ".join(chosen["ood_sets"])} vs {chosen["id_validation_examples"]} '
                 f'{id_side})')
      lines.append(line)
  return ['Scorer hyperparameters:', *lines, ''] if lines else []


# Column titles of the metrics we know; any other metric key is titled by its own name.
_TITLES = {'auroc': 'AUROC', 'fpr95': 'FPR@95', 'fpr95_id': 'FPR@95 (ID+)',
           'aupr_in': 'AUPR-In', 'aupr_out': 'AUPR-Out'}
# The headline's metrics, each a mean over a group's sets.
HEADLINE_METRICS = ('auroc', 'fpr95')
# Report order: the validation sets choose hyperparameters and come first, apart from the
# test sets; any other group follows the known ones.
GROUP_ORDER = ('validation', 'near', 'far')
# A row's fields that name what it measures; the others are metrics.
ROW_KEYS = ('model', 'scorer', 'ood_set', 'ood_group', 'id_set')


def _id_set(row: dict) -> str:
  """The ID set a row's metrics were scored against: evaluate marks those against 'id_val'."""
  return row.get('id_set', 'id_test')


def _validation_title(rows: list[dict]) -> str:
  id_sets = sorted({_id_set(row) for row in rows if row['ood_group'] == 'validation'})
  return f'validation {_TITLES["auroc"]} (vs {", ".join(id_sets)})'


def _metric_keys(rows: list[dict]) -> list[str]:
  """The metrics the rows carry: no fixed list, so a new metric shows up. Known ones come
  first in _TITLES' order (jitted metrics come back in sorted key order)."""
  keys = [key for key in rows[0] if key not in ROW_KEYS] if rows else []
  return [key for key in _TITLES if key in keys] + [key for key in keys if key not in _TITLES]


def _groups(rows: list[dict]) -> list[str]:
  present = dict.fromkeys(row['ood_group'] for row in rows)
  return [g for g in GROUP_ORDER if g in present] + [g for g in present if g not in GROUP_ORDER]


def _percent(value) -> str:
  return f'{100 * value:.2f}'


def _validation_auroc(pair_rows: list[dict]) -> float:
  """The mean AUROC of a pair's validation sets (-inf without any: ranked last)."""
  values = [row['auroc'] for row in pair_rows
            if row['ood_group'] == 'validation' and not row['ood_set'].endswith('_mean')]
  return float(np.mean(values)) if values else -np.inf


def headline_table(rows: list[dict], id_accuracy: dict[str, float]) -> list[str]:
  """One line per model and scorer: each test group's mean of the headline metrics, the
  model's ID accuracy (if any model has a head), then the validation sets' mean AUROC.

  With validation sets, the lines are ranked by that AUROC, best first (ties in
  evaluation order): the pair to ship is chosen on validation, never on a test set.
  """
  metric_keys = [m for m in HEADLINE_METRICS if m in _metric_keys(rows)]
  test_columns = [(g, m) for g in _groups(rows) if g != 'validation' for m in metric_keys]
  validation_columns = [('validation', 'auroc')] if 'validation' in _groups(rows) else []
  titles = ([f'{g} {_TITLES.get(m, m)}' for g, m in test_columns] + ['ID acc.'] * bool(id_accuracy)
            + [_validation_title(rows)] * len(validation_columns))
  ranked = bool(validation_columns)
  lines = ['| ' + 'rank | ' * ranked + 'model | scorer | ' + ' | '.join(titles) + ' |',
           '|' + '---:|' * ranked + '---|---|' + '---:|' * len(titles)]
  pairs = list(_pairs(rows).items())
  if ranked:
    pairs.sort(key=lambda pair: -_validation_auroc(pair[1]))  # stable: ties keep their order
  for rank, ((model, scorer), pair_rows) in enumerate(pairs, 1):
    sets = [row for row in pair_rows if not row['ood_set'].endswith('_mean')]

    def means(columns):
      return [_percent(np.mean([row[m] for row in sets if row['ood_group'] == g]))
              if any(row['ood_group'] == g for row in sets) else '' for g, m in columns]

    accuracy = [_percent(id_accuracy[model]) if model in id_accuracy else ''] * bool(id_accuracy)
    cells = means(test_columns) + accuracy + means(validation_columns)
    lines.append('| ' + f'{rank} | ' * ranked + f'{model} | {scorer} | ' + ' | '.join(cells)
                 + ' |')
  return lines


def per_set_tables(rows: list[dict]) -> list[str]:
  """A table per model and scorer: every set and group mean, validation, near then far."""
  metric_keys = _metric_keys(rows)
  order = {group: i for i, group in enumerate(_groups(rows))}
  lines = []
  for (model, scorer), pair_rows in _pairs(rows).items():
    lines += [f'### {model} / {scorer}', '',
              '| group | OOD set | ' + ' | '.join(_TITLES.get(m, m) for m in metric_keys) + ' |',
              '|---|---|' + '---:|' * len(metric_keys)]
    for row in sorted(pair_rows, key=lambda row: order[row['ood_group']]):  # stable: sets, mean
      name = '**mean**' if row['ood_set'].endswith('_mean') else row['ood_set']
      if row['ood_group'] == 'validation':
        name += f' (vs {_id_set(row)})'
      lines.append(f'| {row["ood_group"]} | {name} | '
                   + ' | '.join(_percent(row[m]) for m in metric_keys) + ' |')
    lines.append('')
  return lines


def markdown_table(rows: list[dict], id_accuracy: dict[str, float],
                   hparams: dict | None = None, sweeps: dict | None = None,
                   models: dict | None = None) -> str:
  """results.md: the headline table, the per-set tables, how models were trained (`models`:
  {model: one line}), then the hparams and conventions lines; percentages with two decimals."""
  model_lines = [f'- {model}: {line}' for model, line in (models or {}).items()]
  return '\n'.join([
      '## Headline', '',
      'Each model and scorer: the mean over each group\'s OOD sets, and the ID test '
      'accuracy. The validation sets choose scorer hyperparameters; they are not a test '
      'result. Ranked by the validation AUROC, best first (when there are validation sets).',
      '', *headline_table(rows, id_accuracy), '',
      '## Per OOD set', '', *per_set_tables(rows),
      *(['Models:', *model_lines, ''] if model_lines else []),
      *_hparams_lines(hparams or {}, sweeps or {}), _CONVENTIONS_LINE, ''])


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
                  sweeps: dict | None = None, models: dict | None = None,
                  changed_settings: dict | None = None, ids: dict | None = None,
                  preprocessing: dict | None = None, compute: dict | None = None) -> str:
  """Writes results.{json,csv,md} (and scores.npz if `scores`); returns the Markdown.

  `scores` is {model: {scorer: {'id': [N], ood_set: [M], ...}}}, stored under keys
  'model/scorer/set' so metrics can be recomputed without re-extracting features; `ids`
  {set: [N]} each example's id, in the same order, under 'ids/set'.
  `hparams` is {model: {scorer: the hparams it ran with}} and `sweeps` {model: {scorer:
  how they were chosen}} (see stages/evaluate.py), both kept in results.json, as are
  `models`, {model: one line on how it was trained}, and `changed_settings` {stage: its
  fields that differ}, of the stages that ran under other settings than the rest
  (mood_jax/train/changed_settings.py). `preprocessing` says how every image became the network's
  input (ood/detector_format.preprocessing), `compute` how the scored model ran: backend, compute dtype
  and attention (vit.compute_record).
  """
  os.makedirs(results_dir, exist_ok=True)
  document = {'conventions': CONVENTIONS, 'id_accuracy': id_accuracy, 'rows': rows,
              'hparams': hparams or {}, 'sweeps': sweeps or {}, 'models': models or {},
              'changed_settings': changed_settings or {}, 'preprocessing': preprocessing or {},
              'compute': compute or {}}
  table = markdown_table(rows, id_accuracy, hparams, sweeps, models)
  outputs = {'results.json': json.dumps(document, indent=2) + '\n',
             'results.csv': _csv_text(rows), 'results.md': table}
  for name, text in outputs.items():
    files.write_atomically(os.path.join(results_dir, name), text.encode())
  if scores is not None:
    files.write_atomically(os.path.join(results_dir, 'scores.npz'),
                           _npz_bytes(scores, ids or {}))
  return table


def _save_figure(figure: 'Figure', path: str) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100)
  files.write_atomically(path, buffer.getvalue())


def histograms(by_set: dict) -> tuple[np.ndarray, dict, bool]:
  """(shared bin edges, {set: bar heights}, whether the axis is symmetric-log)."""
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
  else:  # the clipped scores span exactly [low, high]
    bins = np.histogram_bin_edges([low, high], bins=60)
  # Log-spaced bins differ in width by decades: there a bar is the fraction of its set.
  heights = {name: np.histogram(values, bins)[0] / len(values) if symlog else
             np.histogram(values, bins, density=True)[0] for name, values in clipped.items()}
  return bins, heights, symlog


# More OOD sets than this in one panel crowd it: then each OOD group gets its own panel.
_SETS_PER_PANEL = 4


def histogram_figure(title: str, by_set: dict, groups: dict | None = None) -> 'Figure':
  """ID filled in grey, each OOD set a coloured outline over it; `groups` ({set: group})
  splits crowded sets into a panel per group, validation / near / far."""
  from matplotlib.figure import Figure  # noqa: PLC0415 (here: ~1 s to import, plots only)
  by_set = {name: values for name, values in by_set.items() if name != ID_VAL}
  bins, heights, symlog = histograms(by_set)
  ood = [name for name in by_set if name != 'id']
  panels = {'OOD': ood}
  if groups and len(ood) > _SETS_PER_PANEL:
    panels = {}
    for group in _groups([{'ood_group': groups[name]} for name in ood]):
      panels[group] = [name for name in ood if groups[name] == group]
  figure = Figure(figsize=(6, 1 + 2.5 * len(panels)), layout='constrained')
  for axes, (panel, names) in zip(figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0],
                                  panels.items()):
    axes.stairs(heights['id'], bins, fill=True, color='0.75', label='ID (test)')
    for name in names:
      axes.stairs(heights[name], bins, linewidth=1.5, label=name)
    if symlog:
      axes.set_xscale('symlog', linthresh=min(abs(bins[0]), abs(bins[-1])))
    axes.set(title=f'{title}: {panel}' if len(panels) > 1 else title,
             ylabel='fraction of the set' if symlog else 'density')
    axes.legend(fontsize='small')
  axes.set(xlabel='score (higher = more in-distribution; 1st-99th percentile, tails at edges)')
  return figure


def roc_figure(title: str, by_set: dict, groups: dict | None = None) -> 'Figure':
  """ROC curves, ID positive; each marked at OpenOOD's FPR@95 point, where 95% of the OOD
  set is caught (5% accepted) and FPR@95 is the share of ID rejected there. Validation sets
  (`groups`) are against 'id_val' when there is one, as evaluate scores them."""
  from matplotlib.figure import Figure  # noqa: PLC0415 (as in histogram_figure)
  from sklearn import metrics as sk_metrics  # noqa: PLC0415 (here: ~1 s to import, plots only)
  figure = Figure(figsize=(5, 5), layout='constrained')
  axes = figure.subplots()
  for dataset, ood_scores in by_set.items():
    if dataset in ('id', ID_VAL):
      continue
    against_id_val = ID_VAL in by_set and (groups or {}).get(dataset) == 'validation'
    id_scores = by_set[ID_VAL if against_id_val else 'id']
    is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    scores = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = sk_metrics.roc_curve(is_id, scores)
    values = metrics.ood_metrics(id_scores, ood_scores)
    auroc, fpr95 = float(values['auroc']), float(values['fpr95'])
    vs = f' vs {ID_VAL}' if against_id_val else ''
    line, = axes.plot(fpr, tpr, label=f'{dataset}{vs} (AUROC {100 * auroc:.2f}, '
                      f'FPR@95 {100 * fpr95:.2f})')
    axes.plot(0.05, 1 - fpr95, 'o', color=line.get_color(), markersize=5)
  axes.axvline(0.05, color='0.5', linestyle='--', linewidth=0.8)
  axes.plot([0, 1], [0, 1], 'k:', linewidth=0.8)
  axes.set(title=title, xlabel='OOD accepted as ID (FPR)', ylabel='ID accepted (TPR)')
  axes.legend(loc='lower right', fontsize='small', title='dot: 95% of OOD caught',
              title_fontsize='small')
  return figure


def plot_scores(results_dir: str, scores: dict, groups: dict | None = None) -> list[str]:
  """Per (model, scorer): score histograms and ROC curves (ID positive) in plots/.

  `scores` is {model: {scorer: {'id': [N], ood_set: [M], ...}}}, `groups` {ood_set: group}.
  Figures are built without pyplot (Agg rendering, nothing kept open); returns the paths
  written.
  """
  plots_dir = os.path.join(results_dir, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  paths = []
  for model, by_scorer in scores.items():
    for scorer, by_set in by_scorer.items():
      by_set = {name: np.asarray(values, np.float64) for name, values in by_set.items()}
      title = f'{model} / {scorer}'
      for kind, figure in (('hist', histogram_figure(title, by_set, groups)),
                           ('roc', roc_figure(title, by_set, groups))):
        path = os.path.join(plots_dir, f'{model}_{scorer}_{kind}.png')
        _save_figure(figure, path)
        paths.append(path)
  return paths


def _image_row(subfigure, title: str, images: list, scores: np.ndarray) -> None:
  subfigure.suptitle(title, fontsize='small')
  for axes, image, score in zip(subfigure.subplots(1, len(images), squeeze=False)[0], images,
                                scores):
    gray = image.shape[-1] == 1
    axes.imshow(image[..., 0] if gray else image, cmap='gray' if gray else None, vmin=0,
                vmax=255, interpolation='nearest')
    axes.set_title(f'{score:.4g}', fontsize='x-small')
    axes.set_axis_off()


def plot_extremes(results_dir: str, scores: dict, images, groups: dict | None = None,
                  count: int = 8) -> list[str]:
  """Per (model, scorer), plots/<model>_<scorer>_extremes.png: the `count` ID test images
  scored most OOD (lowest), then per OOD set those scored most ID (highest), each with its
  score: what the detector gets wrong.

  `scores` is plot_scores'; `images(set, positions)` gives the uint8 [H, W, C] images at
  those positions of a set's scores ('id': the ID test set). Returns the paths written."""
  from matplotlib.figure import Figure  # noqa: PLC0415 (as in histogram_figure)
  plots_dir = os.path.join(results_dir, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  paths = []
  for model, by_scorer in scores.items():
    for scorer, by_set in by_scorer.items():
      panels = []  # (set, title, positions), worst first; ties in set order (stable)
      for name in sorted(by_set, key=lambda name: name != 'id'):  # ID first, then set order
        if name == ID_VAL:
          continue
        values = np.asarray(by_set[name], np.float64)
        if name == 'id':
          order, title = np.argsort(values, kind='stable'), 'ID test, scored most OOD'
        else:
          group = f' ({groups[name]})' if groups and name in groups else ''
          order, title = np.argsort(-values, kind='stable'), f'{name}{group}, scored most ID'
        panels.append((name, title, order[:count]))
      figure = Figure(figsize=(1.1 * count, 1.45 * len(panels)), layout='constrained')
      figure.suptitle(f'{model} / {scorer}: higher score = more ID')
      for subfigure, (name, title, positions) in zip(
          np.atleast_1d(figure.subfigures(len(panels), 1)), panels):
        _image_row(subfigure, title, images(name, positions),
                   np.asarray(by_set[name], np.float64)[positions])
      path = os.path.join(plots_dir, f'{model}_{scorer}_extremes.png')
      _save_figure(figure, path)
      paths.append(path)
  return paths

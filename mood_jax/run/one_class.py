"""The one-class protocol averaged over classes (MOOD's CIFAR-10 and CIFAR-100 tables).

With `config.one_class_each`, each class of `data.id_classes` (every class when empty) is in
turn the only ID class, with the rest of the test split as OOD (the `*_heldout` set): one
full run per class in WORKDIR/class_<c>/, then WORKDIR/results/ holds the mean over classes
of every (model, scorer, OOD set) row. Each class's run resumes and skips as any run does.
"""

import json
import os

import ml_collections
import numpy as np

from mood_jax.data import catalogue
from mood_jax.ood import report


def class_configs(config: ml_collections.ConfigDict) -> dict[int, ml_collections.ConfigDict]:
  """class -> the config of its one-class run."""
  classes = config.data.id_classes or catalogue.source(config.data).all_classes()
  configs = {}
  for label in classes:
    one = config.copy_and_resolve_references()
    with one.ignore_type():
      one.one_class_each = False
      one.data.id_classes = (label,)
    configs[label] = one
  return configs


def class_workdir(workdir: str, label) -> str:
  return os.path.join(workdir, f'class_{label}')


def mean_over_classes(rows_by_class: dict) -> list[dict]:
  """Each (model, scorer, OOD set) row's metrics averaged over the classes, in first-class
  order; the group means (near_mean, far_mean) are averaged like any row."""
  by_key = {}
  for rows in rows_by_class.values():
    for row in rows:
      by_key.setdefault((row['model'], row['scorer'], row['ood_set'], row['ood_group']),
                        []).append(row)
  return [{'model': model, 'scorer': scorer, 'ood_set': ood_set, 'ood_group': group,
           **{m: float(np.mean([row[m] for row in rows])) for m in report.METRICS},
           **({'id_set': rows[0]['id_set']} if 'id_set' in rows[0] else {})}
          for (model, scorer, ood_set, group), rows in by_key.items()]


def write_mean(workdir: str, labels) -> str:
  """WORKDIR/results/ from the classes' results; returns the Markdown table."""
  rows_by_class, accuracy = {}, {}
  for label in labels:
    with open(os.path.join(class_workdir(workdir, label), 'results', 'results.json')) as f:
      results = json.load(f)
    rows_by_class[label] = results['rows']
    for model, value in results['id_accuracy'].items():
      accuracy.setdefault(model, []).append(value)
  return report.write_results(os.path.join(workdir, 'results'), mean_over_classes(rows_by_class),
                              {model: float(np.mean(v)) for model, v in accuracy.items()})

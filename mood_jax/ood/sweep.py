"""Choosing a scorer's hyperparameters on an OOD *validation* set, never on a test set."""

import itertools
from typing import Mapping, Sequence

from mood_jax.ood import metrics, scorers

HIGHER_IS_BETTER = ('auroc', 'aupr_in', 'aupr_out')
LOWER_IS_BETTER = ('fpr95', 'fpr95_id')


def select_hparams(scorer: scorers.Scorer, grid: Mapping[str, Sequence], train: dict,
                   id_val: dict, ood_val: dict, *, metric: str = 'auroc',
                   mesh=None) -> tuple[dict, list[dict]]:
  """The grid point with the best `metric` of ID validation vs OOD validation scores.

  `train`, `id_val` and `ood_val` hold 'features', 'logits' and 'label' arrays, as
  `extraction.extract` returns them; `train['head']` is the classifier head for the scorers
  that use one (absent or None for the others). The scorer is fitted on `train` and
  scored on the two validation sets only: the caller must not pass test data here, and
  the OOD validation set should be none of the OOD test sets.

  Tries every combination of `grid` (name -> values; hparams not named keep the scorer's
  values). Ties go to the first combination in grid order (the first values listed, the
  last name varying fastest). Returns (the best hparams, one row per combination: its
  hparams and every metric).
  """
  if metric not in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER):
    raise ValueError(f'metric {metric!r}: use auroc, aupr_in, aupr_out, fpr95 or fpr95_id')
  sign = -1. if metric in LOWER_IS_BETTER else 1.
  trials = []
  for values in itertools.product(*grid.values()):
    hparams = dict(zip(grid, values))
    trial = scorer.with_hparams(**hparams)
    stats = scorers.fit(trial, train['features'], train['logits'], train['label'],
                        train.get('head'), mesh=mesh)
    id_scores, ood_scores = (
        scorers.score(trial, stats, split['features'], split['logits'], mesh=mesh)
        for split in (id_val, ood_val))
    values = metrics.ood_metrics(id_scores, ood_scores)
    trials.append({**hparams, **{name: float(value) for name, value in values.items()}})
  best = max(trials, key=lambda row: sign * row[metric])  # max keeps the first of equals
  return {name: best[name] for name in grid}, trials

"""Which model and scorers a detector keeps (`evaluate.detector`, `python -m mood_jax.export`),
and its decision thresholds. The detector directory is mood_jax/detector.py's."""

import ml_collections
import numpy as np

from mood_jax import config_checks
from mood_jax.errors import UserError
from mood_jax.ood import scorers as scorers_lib
from mood_jax.ood import sweep


def tpr_name(tpr: float) -> str:
  return f'tpr{100 * tpr:g}'


def thresholds(id_scores: np.ndarray, tprs) -> dict[str, float]:
  """{'tpr95': t, ...}: the highest t with at least `tpr` of `id_scores` >= t."""
  ranked = np.sort(np.asarray(id_scores, np.float64))
  # The epsilon keeps (1 - 0.9) * 30 = 2.999999999999999 from flooring to 2.
  return {tpr_name(tpr): float(ranked[int(np.floor((1 - tpr) * len(ranked) + 1e-9))])
          for tpr in tprs}


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """`evaluate.detector`'s errors, before anything runs."""
  det = cfg.detector
  if det.scorers != 'auto':
    stray = (set(config_checks.names(det.scorers))
             - {s.name for s in scorers_lib.resolve(cfg.scorers)})
    if stray:
      raise UserError(f'evaluate.detector.scorers names {sorted(stray)}, which '
                      'evaluate.scorers does not select: add them there, or set it to auto')
  if det.model != 'auto' and cfg.models != 'auto' and det.model not in cfg.models.split(','):
    raise UserError(f'evaluate.detector.model={det.model!r} is not in evaluate.models='
                    f'{cfg.models!r}: add it there, or set it to auto')
  check_tprs(det.tprs, 'evaluate.detector.tprs')


def check_tprs(tprs, what: str) -> None:
  if not tprs or not all(0 < tpr < 1 for tpr in tprs):
    raise UserError(f'{what}={tuple(tprs)}: give ID true-positive rates inside (0, 1), '
                    'e.g. 0.95')


def choose(rows: list[dict], cfg: ml_collections.ConfigDict,
           scored: dict[str, list[str]]) -> tuple[str, list[str], str]:
  """(model, scorers, why) that `evaluate.detector` names; 'auto' is the best on the
  'validation' OOD sets by `evaluate.sweep_metric` (mean over those sets). `scored` is
  {model: scorers it has scores of}, in evaluation order."""
  det = cfg.detector
  models = list(scored) if det.model == 'auto' else [det.model]
  if det.model != 'auto' and det.model not in scored:
    raise UserError(f'evaluate.detector.model={det.model!r} was not evaluated: valid: '
                    f'{list(scored)}')
  wanted = None if det.scorers == 'auto' else config_checks.names(det.scorers)
  # Each candidate is a model with one scorer ('auto') or with all the named ones.
  candidates = [(model, [s] if wanted is None else wanted) for model in models
                for s in (scored[model] if wanted is None else [None])]
  candidates = [(m, names) for m, names in candidates if set(names) <= set(scored[m])]
  if not candidates:
    raise UserError(f'no evaluated model has every scorer of evaluate.detector.scorers='
                    f'{det.scorers!r}; evaluated: {scored}')
  metric = cfg.sweep_metric
  values = {}
  for model, names in candidates:
    picked = [row[metric] for row in rows if row['model'] == model and row['scorer'] in names
              and row['ood_group'] == 'validation']
    if picked:
      values[(model, tuple(names))] = float(np.mean(picked))
  if len(candidates) == 1:
    return *candidates[0], 'as evaluate.detector names it'
  if not values:
    model, names = candidates[0]
    return model, names, ('no validation OOD set to choose on: the first model and scorer '
                          'evaluated')
  best = (max if metric in sweep.HIGHER_IS_BETTER else min)(values, key=values.get)
  return best[0], list(best[1]), (f'best mean {metric} on the validation OOD sets '
                                  f'({values[best]:.4f})')

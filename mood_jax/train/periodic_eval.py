"""Evaluation during fine-tuning (finetune, logit_ft): ID accuracy, and one scorer's AUROC
against each OOD validation set (the 'validation' group of data.ood_sets; never a test set).

The ID side is the ID validation split when there is one (data.id_val_fraction > 0): then
nothing here reads a test split, and the keys say 'id_val'. Without one it is the test split,
as big_vision and timm evaluate during training. The scorer is fitted on the ID training set
when it needs stats (e.g. mahalanobis_mood), which costs a pass over it.
"""

import functools
from typing import Callable

import ml_collections
import numpy as np

from mood_jax.ood import extraction
from mood_jax.data import catalogue
from mood_jax.data.sources import source
from mood_jax.errors import UserError
from mood_jax.ood import metrics, scorers


def validation_sets(config: ml_collections.ConfigDict) -> list[str]:
  return [name for name, group in catalogue.source(config.data).ood_groups().items()
          if group == 'validation']


def check_config(config: ml_collections.ConfigDict, stage: str) -> None:
  """The eval scorer of `stage` must exist and work from features and logits alone."""
  cfg = config[stage]
  if cfg.eval_every <= 0:
    return
  try:
    scorer = scorers.get(cfg.eval_scorer)
  except KeyError as e:
    raise UserError(f'{stage}.eval_scorer: {e.args[0]}') from None
  if scorer.perturb is not None or scorer.forward is not None:
    raise UserError(f'{stage}.eval_scorer={cfg.eval_scorer} needs its own forward pass per '
                    'set: choose one that scores features or logits, e.g. msp')


def make_eval_fn(config: ml_collections.ConfigDict, stage: str, model, mesh,
                 classifier_params: Callable[[dict], dict] = lambda params: params
                 ) -> Callable[[dict], dict]:
  """train params -> {'id_accuracy': ..., '<scorer>_auroc_<set>': ...} for `stage`'s
  eval_scorer ('id_val_accuracy' and '<scorer>_auroc_<set>_vs_id_val' against the ID
  validation split); `classifier_params` maps the stage's params to the classifier's."""
  scorer = scorers.configured(scorers.get(config[stage].eval_scorer), config.evaluate.hparams)
  ood_sets = validation_sets(config)
  with_id_val = catalogue.source(config.data).has_id_val()
  id_set, suffix = (source.ID_VAL, '_vs_id_val') if with_id_val else ('id_test', '')
  forward = extraction.make_forward(model, mesh)

  def eval_fn(params):
    params = classifier_params(params)
    extract = functools.partial(extraction.extract, forward, params, config.data, mesh=mesh,
                                batch_size=config.evaluate.batch_size, seed=config.seed)
    id_data = extract(which=id_set)
    accuracy_key = 'id_val_accuracy' if with_id_val else 'id_accuracy'
    results = {accuracy_key: float(metrics.accuracy(id_data['logits'], id_data['label']))}
    if not ood_sets:
      return results
    fit_on = extract(which='id_train') if scorers.needs_train_stats(scorer) else id_data
    stats = scorers.fit(scorer, fit_on['features'], fit_on['logits'], fit_on['label'],
                        params['head'], mesh=mesh)

    def scores(data):
      return np.asarray(scorers.score(scorer, stats, data['features'], data['logits'],
                                      mesh=mesh))

    id_scores = scores(id_data)
    for name in ood_sets:
      auroc = metrics.ood_metrics(id_scores, scores(extract(which=name)))['auroc']
      results[f'{scorer.name}_auroc_{name}{suffix}'] = float(auroc)
    return results

  return eval_fn

"""Evaluation during fine-tuning (finetune, logit_ft): ID test accuracy, and one scorer's
AUROC against each OOD validation set (the 'validation' group of data.ood_sets; never a
test set).

The digits and the TFDS datasets have no ID validation split, so the ID side is the test
split, as big_vision and timm evaluate during training. The scorer is fitted on the ID
training set when it needs stats (e.g. mahalanobis_mood), which costs a pass over it.
"""

import functools
from typing import Callable

import ml_collections
import numpy as np

from mood_jax import inference
from mood_jax.data import catalogue
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
  if scorer.perturb is not None:
    raise UserError(f'{stage}.eval_scorer={cfg.eval_scorer} perturbs the inputs, another pass '
                    'per set: choose one that scores features or logits, e.g. msp')


def make_eval_fn(config: ml_collections.ConfigDict, stage: str, model, mesh,
                 classifier_params: Callable[[dict], dict] = lambda params: params
                 ) -> Callable[[dict], dict]:
  """train params -> {'id_accuracy': ..., '<scorer>_auroc_<set>': ...} for `stage`'s
  eval_scorer; `classifier_params` maps the stage's params to the classifier's (logit_ft)."""
  scorer = scorers.configured(scorers.get(config[stage].eval_scorer), config.evaluate.hparams)
  ood_sets = validation_sets(config)
  forward = inference.make_forward(model, mesh)

  def eval_fn(params):
    params = classifier_params(params)
    extract = functools.partial(inference.extract, forward, params, config.data, mesh=mesh,
                                batch_size=config.evaluate.batch_size, seed=config.seed)
    id_test = extract(which='id_test')
    results = {'id_accuracy': float(metrics.accuracy(id_test['logits'], id_test['label']))}
    if not ood_sets:
      return results
    fit_on = extract(which='id_train') if scorers.needs_train_stats(scorer) else id_test
    stats = scorers.fit(scorer, fit_on['features'], fit_on['logits'], fit_on['label'],
                        params['head'], mesh=mesh)

    def scores(data):
      return np.asarray(scorers.score(scorer, stats, data['features'], data['logits'],
                                      mesh=mesh))

    id_scores = scores(id_test)
    for name in ood_sets:
      auroc = metrics.ood_metrics(id_scores, scores(extract(which=name)))['auroc']
      results[f'{scorer.name}_auroc_{name}'] = float(auroc)
    return results

  return eval_fn

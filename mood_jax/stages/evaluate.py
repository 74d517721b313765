"""Stage 4: features and logits for ID and OOD sets, OOD scores, metrics, report."""

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from mood_jax import inference, train_loop
from mood_jax.data import input_pipeline
from mood_jax.ood import metrics, report, scorers
from mood_jax.stages import finetune, logit_ft

NAME = 'evaluate'


def _pretrain_encoder(config, workdir, mesh):
  """The MIM encoder alone: features only (its head is untrained, so no logit scorers)."""
  model, init_params, _, _ = finetune.setup(config)
  return model, finetune.params_from_pretrain(config, workdir, mesh, init_params), False


def _finetuned(config, workdir, mesh):
  model, init_params, tx, _ = finetune.setup(config)
  return model, train_loop.restore_params(workdir, finetune.NAME, init_params, tx, mesh), True


def _logit_finetuned(config, workdir, mesh):
  return *logit_ft.trained_classifier(config, workdir, mesh), True


# model name -> (config, workdir, mesh) -> (flax model, params, has a trained head)
MODELS = {'pretrain': _pretrain_encoder, 'finetune': _finetuned, 'logit_ft': _logit_finetuned}
CLASSIFIERS = ('finetune', 'logit_ft')


def model_names(models: str, workdir: str) -> list[str]:
  """`evaluate.models` as a list; 'auto' is every classifier trained in the workdir, or the
  pretrain encoder when there is none (one-class runs)."""
  if models != 'auto':
    return models.split(',')
  return [name for name in CLASSIFIERS
          if train_loop.final_step(workdir, name) is not None] or ['pretrain']


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
  cfg = config.evaluate
  groups = input_pipeline.ood_groups(config.data)
  rows, id_accuracy, all_scores = [], {}, {}
  for model_name in model_names(cfg.models, workdir):
    model, params, has_head = MODELS[model_name](config, workdir, mesh)
    forward = inference.make_forward(model, mesh)
    sets = {name: inference.extract(forward, params, config, name, mesh)
            for name in ('id_train', 'id_test', *groups)}
    if has_head:
      id_accuracy[model_name] = float(metrics.accuracy(sets['id_test']['logits'],
                                                       sets['id_test']['label']))
    head = params['head'] if has_head else None
    all_scores[model_name] = {}
    for scorer in map(scorers.get, cfg.scorers.split(',')):
      if scorer.needs_logits and not has_head:
        logging.info('[evaluate] %s: skipping %s (no trained classifier head)', model_name,
                     scorer.name)
        continue
      train = sets['id_train']
      stats = scorer.fit(train['features'], train['logits'], train['label'], head)
      by_set = {name: np.asarray(scorer.score(stats, s['features'], s['logits']))
                for name, s in sets.items() if name != 'id_train'}
      by_set['id'] = by_set.pop('id_test')
      all_scores[model_name][scorer.name] = by_set
      for ood_set, group in groups.items():
        values = metrics.ood_metrics(by_set['id'], by_set[ood_set])
        rows.append({'model': model_name, 'scorer': scorer.name, 'ood_set': ood_set,
                     'ood_group': group, **{k: float(v) for k, v in values.items()}})
  if jax.process_index() == 0:
    results_dir = os.path.join(workdir, 'results')
    table = report.write_results(results_dir, report.summarize(rows), id_accuracy,
                                 scores=all_scores)
    if cfg.plots:
      report.plot_scores(results_dir, all_scores)
    print(table)
    logging.info('[evaluate] results in %s', results_dir)

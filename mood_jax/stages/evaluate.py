"""Stage 4: features and logits for ID and OOD sets, OOD scores, metrics, report."""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mood_jax import parallel, train_loop
from mood_jax.data import input_pipeline
from mood_jax.ood import metrics, report, scorers
from mood_jax.stages import finetune

NAME = 'evaluate'


def _pretrain_encoder(config, workdir, mesh):
  """The MIM encoder alone: features only (its head is untrained, so no logit scorers)."""
  model, init_params, _, _ = finetune.setup(config)
  return model, finetune.params_from_pretrain(config, workdir, mesh, init_params), False


def _finetuned(config, workdir, mesh):
  model, init_params, tx, _ = finetune.setup(config)
  return model, train_loop.restore_params(workdir, finetune.NAME, init_params, tx, mesh), True


# model name -> (config, workdir, mesh) -> (flax model, params, has a trained head)
MODELS = {'pretrain': _pretrain_encoder, 'finetune': _finetuned}


def make_forward(model, mesh):
  """Jitted (params, images) -> (features, logits), batch split over the data axis."""
  def features_and_logits(params, images):
    logits, aux = model.apply({'params': params}, images)
    return aux['features'], logits

  return jax.jit(features_and_logits,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def extract(forward, params, config, which: str, mesh) -> dict:
  """Features, logits and labels of one data set as host numpy arrays, padding dropped."""
  start = time.perf_counter()
  dataset, num_examples = input_pipeline.eval_dataset(
      config.data, which, global_batch_size=config.evaluate.batch_size)
  parts = []
  for batch in dataset:
    batch = parallel.global_batch(batch, mesh)
    features, logits = forward(params, batch['image'])
    parts.append({'features': features, 'logits': logits, 'label': batch['label'],
                  'valid': batch['valid']})
  # Gathered once: the scorers need the whole set (a bank or a query set) per host.
  gathered = multihost_utils.process_allgather(
      jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts), tiled=True)
  valid = gathered.pop('valid')
  out = {k: np.asarray(v)[valid] for k, v in gathered.items()}
  if len(out['label']) != num_examples:  # padding must hide exactly the filler rows
    raise RuntimeError(f'{which}: extracted {len(out["label"])} examples, expected {num_examples}')
  logging.info('[evaluate] %s: %d examples in %.1fs', which, num_examples,
               time.perf_counter() - start)
  return out


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
  cfg = config.evaluate
  groups = input_pipeline.ood_groups(config.data)
  rows, id_accuracy, all_scores = [], {}, {}
  for model_name in cfg.models.split(','):
    model, params, has_head = MODELS[model_name](config, workdir, mesh)
    forward = make_forward(model, mesh)
    sets = {name: extract(forward, params, config, name, mesh)
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

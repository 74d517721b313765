"""Stage 4: features and logits for ID and OOD sets, OOD scores, metrics, report.

Each scorer runs with its hparams from `evaluate.hparams`, except those named in
`evaluate.sweep`: their grid (`evaluate.sweep_grids`) is tried on the OOD sets of the
'validation' group in `data.ood_sets` against the ID validation split ('id_val', when
data.id_val_fraction > 0; else a held-out part of the ID training set), and the best point is
used on the test sets. Test OOD sets never take part in the choice, nor, with 'id_val', does
the ID test split: the validation sets' metrics are then scored against 'id_val' too.
"""

import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from mood_jax import config_checks, watchdog
from mood_jax.data import catalogue, data_config, input_pipeline
from mood_jax.data.sources import embedded, source
from mood_jax.errors import UserError
from mood_jax.models import vit
from mood_jax.ood import (detector_choice, detector_format, extraction, metrics, report, scorers,
                          sweep)
from mood_jax.stages import evaluate_parts
from mood_jax.train import changed_settings, checkpoint, metrics_log
from mood_jax.stages import finetune, logit_ft

NAME = 'evaluate'
VALIDATION = 'validation'
ID_VAL = source.ID_VAL


def _pretrain_encoder(config, workdir, placement):
  """The MIM encoder alone: features only (its head is untrained, so no logit scorers)."""
  model, init_params = finetune.classifier(config, drop_path=0.0)
  return model, finetune.params_from_pretrain(workdir, init_params, placement), False


def _random_init(config, workdir, placement):
  """The encoder as initialised (config.seed), never trained, of the pretrain encoder's shape:
  the control that says how much of the pretrain encoder's score its training earns."""
  del workdir
  model, init_params = finetune.classifier(config, drop_path=0.0)
  return model, placement.create(init_params), False


def _converted(config, workdir, placement):
  """Public weights as converted (finetune.init_from), not trained here: MOOD's ImageNet-1k
  row scores BEiT's pt22k_ft1k classifier as released, its one-class CIFAR rows the pt22k
  encoder. The head is scored if the conversion kept it (--keep_head)."""
  model, init_params = finetune.classifier(config, drop_path=0.0)
  params, has_head = finetune.params_from_converted(config, init_params, placement,
                                                    with_head=True)
  return model, params, has_head


def _finetuned(config, workdir, placement):
  model, init_params = finetune.classifier(config, drop_path=0.0)
  return model, checkpoint.restore_params(workdir, finetune.NAME, init_params, placement), True


def _logit_finetuned(config, workdir, placement):
  return *logit_ft.trained_classifier(config, workdir, placement), True


# model name -> (config, workdir, placement) -> (flax model, params, has a trained head)
MODELS = {'pretrain': _pretrain_encoder, 'random_init': _random_init, 'converted': _converted,
          'finetune': _finetuned, 'logit_ft': _logit_finetuned}
CLASSIFIERS = ('finetune', 'logit_ft')


def hparams_config() -> ml_collections.ConfigDict:
  """Every registered scorer's hparams, for a config file, so that the command line can set
  any of them: --config.evaluate.hparams.knn.k=10."""
  return ml_collections.ConfigDict({
      scorer.name: {name: config_dict.placeholder(int) if value is None else value
                    for name, value in scorer.hparams.items()}
      for scorer in scorers.resolve('all') if scorer.hparams})


def swept_names(cfg, selected: list[scorers.Scorer]) -> list[str]:
  """`evaluate.sweep` as names: 'all' is every selected scorer that has a grid."""
  if cfg.sweep.strip() == 'all':
    return [scorer.name for scorer in selected if scorer.name in cfg.sweep_grids]
  return config_checks.names(cfg.sweep)


# MOOD fits its Gaussian on ID-train features through the training transforms
# (MOOD eval_with_features.py: build_dataset(is_train=True), so datasets.py's
# build_transform(is_train=True)); OpenOOD fits every postprocessor on un-augmented ID images
# (openood/evaluation_api/datasets.py: the test-time preprocessor for 'train' too). So
# `evaluate.id_train_augment` reaches these scorers' bank only.
FITS_AUGMENTED_BANK = ('mahalanobis_mood',)
AUGMENTED_ID_TRAIN = 'id_train_augmented'
ID_TRAIN_BANKS = ('id_train', AUGMENTED_ID_TRAIN)  # fitted on, not scored


def id_train_banks(cfg, scorer_names: list[str]) -> dict[str, bool | str]:
  """{set name: augment} of the ID-train extractions that the named scorers fit on."""
  on_id_val = config_checks.names(cfg.fit_on_id_validation)
  augmented = [bool(cfg.id_train_augment) and name in FITS_AUGMENTED_BANK
               and name not in on_id_val for name in scorer_names]
  return {**({} if augmented and all(augmented) else {'id_train': False}),
          **({AUGMENTED_ID_TRAIN: cfg.id_train_augment} if any(augmented) else {})}


def fit_rows(scorer_name: str, cfg, sets: dict, seed: int) -> dict:
  """The ID rows a scorer is fitted on: ID train (augmented for FITS_AUGMENTED_BANK when
  `evaluate.id_train_augment` is set), or for those named in `evaluate.fit_on_id_validation`
  and those marked `fits_on_id_validation` (temperature scaling) the ID validation split
  ('id_val' in `sets`, else the held-out `sweep_id_fraction` part of ID train, which the
  model did train on). OpenOOD v1.5 fits react, klm and residual on ID validation
  (openood/postprocessors/react_postprocessor.py, kl_matching_postprocessor.py,
  residual_postprocessor.py: id_loader_dict['val'])."""
  if (scorer_name in config_checks.names(cfg.fit_on_id_validation)
      or scorers.get(scorer_name).fits_on_id_validation):
    if ID_VAL in sets:
      return sets[ID_VAL]
    return hold_out(sets['id_train'], cfg.sweep_id_fraction, seed)[1]
  if scorer_name in FITS_AUGMENTED_BANK and AUGMENTED_ID_TRAIN in sets:
    return sets[AUGMENTED_ID_TRAIN]
  return sets['id_train']


def check_config(config: ml_collections.ConfigDict) -> None:
  """This stage's config errors, before anything runs (after the data config's)."""
  cfg, groups = config.evaluate, catalogue.source(config.data).ood_groups()
  if not groups:
    raise UserError('no OOD sets to evaluate: set --config.data.ood_sets')
  config_checks.at_least('evaluate.batch_size', cfg.batch_size, 1, 256)
  if cfg.models != 'auto':
    for name in cfg.models.split(','):
      if name not in MODELS:
        raise UserError(f'unknown evaluate model {name!r}: valid choices are auto, '
                        f'{", ".join(MODELS)}')
  if cfg.id_train_augment not in data_config.AUGMENT_CHOICES:
    raise UserError(f'unknown evaluate.id_train_augment {cfg.id_train_augment!r}: valid choices '
                    f'are {", ".join(map(str, data_config.AUGMENT_CHOICES))}')
  try:
    selected = {scorer.name: scorers.configured(scorer, cfg.hparams)
                for scorer in scorers.resolve(cfg.scorers)}
  except (KeyError, ValueError) as e:
    raise UserError(f'evaluate: {e.args[0]}') from None
  detector_choice.check_config(cfg)
  for name in config_checks.names(cfg.fit_on_id_validation):
    if name not in selected:
      raise UserError(f'evaluate.fit_on_id_validation names {name!r}, which evaluate.scorers '
                      'does not select')
  to_sweep = swept_names(cfg, list(selected.values()))
  fits_on_id_val = (cfg.fit_on_id_validation.strip()
                    or any(s.fits_on_id_validation for s in selected.values()))
  if (to_sweep or fits_on_id_val) and not 0 < cfg.sweep_id_fraction < 1:
    raise UserError(f'evaluate.sweep_id_fraction={cfg.sweep_id_fraction} must be inside (0, 1)')
  if not to_sweep:
    return
  if VALIDATION not in groups.values():
    raise UserError(f'evaluate.sweep={cfg.sweep!r} needs an OOD validation set: add one to '
                    f'data.ood_sets (digits: {", ".join(embedded.VALIDATION_OOD_SETS)}; '
                    'other datasets: name it in data.validation_ood_sets too), or set '
                    "--config.evaluate.sweep=''")
  if cfg.sweep_metric not in (*sweep.HIGHER_IS_BETTER, *sweep.LOWER_IS_BETTER):
    raise UserError(f'unknown evaluate.sweep_metric {cfg.sweep_metric!r}: valid choices are '
                    f'{", ".join((*sweep.HIGHER_IS_BETTER, *sweep.LOWER_IS_BETTER))}')
  for name in to_sweep:
    scorer, grid = selected.get(name), cfg.sweep_grids.get(name)
    if scorer is None:
      raise UserError(f'evaluate.sweep names {name!r}, which evaluate.scorers does not select')
    if scorer.perturb is not None or scorer.forward is not None:
      raise UserError(f'{name} is not swept (each grid point would extract every validation '
                      f'set again): set --config.evaluate.hparams.{name}.* and drop it from '
                      'evaluate.sweep')
    if grid is None:
      raise UserError(f'evaluate.sweep names {name!r}, which has no grid in '
                      'evaluate.sweep_grids')
    if not all(grid.values()):
      raise UserError(f'evaluate.sweep_grids.{name} has an empty list of values')
    try:
      scorer.with_hparams(**{hparam: values[0] for hparam, values in grid.items()})
    except ValueError as e:
      raise UserError(f'evaluate.sweep_grids.{name}: {e}') from None


def model_names(models: str, workdir: str) -> list[str]:
  """`evaluate.models` as a list; 'auto' is every classifier trained in the workdir, or the
  pretrain encoder when there is none (one-class runs)."""
  if models != 'auto':
    return models.split(',')
  return [name for name in CLASSIFIERS
          if checkpoint.final_step(workdir, name) is not None] or ['pretrain']


def hold_out(train: dict, fraction: float, seed: int) -> tuple[dict, dict]:
  """(fit part, ID validation part) of the ID training set, by a seeded permutation: the
  validation rows must not be in the bank a scorer fits (knn would find each one itself)."""
  order = np.random.default_rng(seed).permutation(len(train['label']))
  cut = int(round(fraction * len(order)))
  return tuple({key: values[np.sort(rows)] for key, values in train.items()}
               for rows in (order[cut:], order[:cut]))


def _choose_hparams(scorer, cfg, sets, head, groups, seed, mesh):
  """The best point of the scorer's grid on the validation OOD sets (pooled); returns the
  scorer with it, and what the choice was made of, for the results."""
  validation_sets = [name for name, group in groups.items() if group == VALIDATION]
  if ID_VAL in sets:  # never trained on, so the scorer's bank can be all of ID train
    fit_part, id_val = sets['id_train'], sets[ID_VAL]
  else:
    fit_part, id_val = hold_out(sets['id_train'], cfg.sweep_id_fraction, seed)
  ood_val = {key: np.concatenate([sets[name][key] for name in validation_sets])
             for key in ('features', 'logits', 'label')}
  best, trials = sweep.select_hparams(scorer, cfg.sweep_grids[scorer.name].to_dict(),
                                      {**fit_part, 'head': head}, id_val, ood_val,
                                      metric=cfg.sweep_metric, mesh=mesh)
  logging.info('[evaluate] %s: chose %s on %s (%s)', scorer.name, best, validation_sets,
               cfg.sweep_metric)
  record = {'ood_sets': validation_sets, 'id_validation_examples': len(id_val['label']),
            'metric': cfg.sweep_metric, 'chosen': best, 'trials': trials,
            **({'id_set': ID_VAL} if ID_VAL in sets else {})}  # absent: held-out ID train
  return scorer.with_hparams(**best), record


def extract_sets(extract, forward, names) -> dict:
  """{name: extracted} of sets `names` ({name: augment} or a list) through `forward`; the
  ID-train banks read 'id_train' (the augmented one through the training transforms)."""
  augment = names if isinstance(names, dict) else {}
  return {name: extract(forward, which='id_train' if name in ID_TRAIN_BANKS else name,
                        augment=augment.get(name, False)) for name in names}


def fit_and_score(config: ml_collections.ConfigDict, scorer: scorers.Scorer, sets: dict,
                  queries: dict, head, model, extract, mesh) -> tuple[dict, dict]:
  """(stats, {query set: scores}) of one configured scorer: fitted on its rows of `sets`
  (fit_rows), scoring the extracted `queries`. The evaluate stage and export share it.

  A scorer with its own pass (ODIN's moved inputs, a layer scorer's layers) scores the
  queries extracted again through it, and a layer scorer fits on its layers of `sets` too;
  `extract(forward, which=name)` extracts set `name` of config.data.
  """
  if scorer.perturb is not None or scorer.forward is not None:
    own = extraction.make_forward(model, mesh,
                                  **extraction.forward_options(scorer, config.data.std))
    queries = extract_sets(extract, own, list(queries))
    if scorer.forward is not None:
      banks = {name: config.evaluate.id_train_augment if name == AUGMENTED_ID_TRAIN else False
               for name in sets}
      sets = extract_sets(extract, own, banks)
  train = fit_rows(scorer.name, config.evaluate, sets, config.seed)
  logging.info('[evaluate] %s fitted on %d ID examples', scorer.name, len(train['label']))
  stats = scorers.fit(scorer, train['features'], train['logits'], train['label'], head,
                      mesh=mesh)
  return stats, {name: scorers.score(scorer, stats, s['features'], s['logits'], mesh=mesh)
                 for name, s in queries.items()}


@dataclasses.dataclass(frozen=True)
class Scored:
  """One (model, scorer) the evaluate stage scored."""
  model: str
  scorer: scorers.Scorer  # configured: the hparams it ran with (chosen, if it was swept)
  stats: dict             # what it fitted on the ID rows
  scores: dict            # {'id': ID test scores, set: scores} for every other set
  sweep: dict | None      # how its hparams were chosen, if swept


def _per_model(scored: list[Scored], models: list[str], value) -> dict:
  """{model: {scorer: value(record)}} with every evaluated model, in evaluation order;
  records whose value is None are left out."""
  return {model: {s.scorer.name: value(s) for s in scored
                  if s.model == model and value(s) is not None} for model in models}


def _metric_rows(s: Scored, groups: dict) -> list[dict]:
  """One results row per OOD set of a (model, scorer)."""
  rows = []
  for ood_set, group in groups.items():
    # With an ID validation split, validation scores read no test data at all.
    against_id_val = group == VALIDATION and ID_VAL in s.scores
    values = metrics.ood_metrics(s.scores[ID_VAL if against_id_val else 'id'], s.scores[ood_set])
    rows.append({'model': s.model, 'scorer': s.scorer.name, 'ood_set': ood_set,
                 'ood_group': group, **{k: float(v) for k, v in values.items()},
                 **({'id_set': ID_VAL} if against_id_val else {})})  # absent: id_test
  return rows


def run(config: ml_collections.ConfigDict, workdir: str, placement) -> None:
  """Scores every model of `evaluate.models` with every scorer of `evaluate.scorers` on the ID
  test split and each OOD set; writes WORKDIR/results/ (results.{json,csv,md}, scores.npz,
  plots) and, with `evaluate.detector.write`, WORKDIR/detector/."""
  cfg, mesh = config.evaluate, placement.mesh
  data_source = catalogue.source(config.data)
  groups = data_source.ood_groups()
  id_sets = data_source.id_sets()
  selected = [scorers.configured(scorer, cfg.hparams) for scorer in scorers.resolve(cfg.scorers)]
  to_sweep = swept_names(cfg, selected)
  models = model_names(cfg.models, workdir)
  scored, id_accuracy = [], {}
  trained_with = {}  # model -> one line on its training, for the report
  parts = evaluate_parts.Parts(workdir, config, models)  # what a stopped run finished
  for model_name in models:
    if model_name == logit_ft.NAME:
      trained_with[model_name] = logit_ft.trained_with(workdir)
    model_part = parts.get(model_name)
    if model_part is None or any(parts.get(model_name, s.name) is None for s in selected
                                 if model_part['has_head'] or not s.needs_logits):
      model, params, has_head = MODELS[model_name](config, workdir, placement)
      head = params['head'] if has_head else None
      extract = functools.partial(extraction.extract, params=params, data_cfg=config.data,
                                  mesh=mesh, batch_size=cfg.batch_size, seed=config.seed)
      forward = extraction.make_forward(model, mesh)
      banks = id_train_banks(cfg, [scorer.name for scorer in selected])
      sets = extract_sets(extract, forward, {
          **banks, **{name: False for name in (*id_sets, *groups) if name != 'id_train'}})
      model_part = {
          'has_head': has_head,
          'ids': {'id' if name == 'id_test' else name: data_source.example_ids(name, s['index'])
                  for name, s in sets.items() if name not in ID_TRAIN_BANKS},
          'indices': {'id' if name == 'id_test' else name: s['index']
                      for name, s in sets.items() if name not in ID_TRAIN_BANKS},
          'id_accuracy': float(metrics.accuracy(sets['id_test']['logits'],
                                                sets['id_test']['label'])) if has_head else None}
      parts.put(model_name, model_part)
    ids, has_head = model_part['ids'], model_part['has_head']
    if has_head:
      id_accuracy[model_name] = model_part['id_accuracy']
    for scorer in selected:
      watchdog.beat(f'evaluate: {model_name}, {scorer.name}')
      if scorer.needs_logits and not has_head:
        logging.info('[evaluate] %s: skipping %s (no trained classifier head)', model_name,
                     scorer.name)
        continue
      part = parts.get(model_name, scorer.name)
      if part is None:
        chosen = None
        if scorer.name in to_sweep:
          scorer, chosen = _choose_hparams(scorer, cfg, sets, head, groups, config.seed, mesh)
        queries = {name: s for name, s in sets.items() if name not in ID_TRAIN_BANKS}
        stats, by_set = fit_and_score(config, scorer, sets, queries, head, model, extract, mesh)
        by_set['id'] = by_set.pop('id_test')
        part = {'scores': by_set, 'stats': stats, 'hparams': dict(scorer.hparams),
                'sweep': chosen}
        parts.put(model_name, part, scorer.name)
      else:
        logging.info('[evaluate] %s: %s as a stopped run finished it', model_name, scorer.name)
      scored.append(Scored(model_name, scorer.with_hparams(**part['hparams']), part['stats'],
                           part['scores'], part['sweep']))
  rows = [row for s in scored for row in _metric_rows(s, groups)]
  all_scores = _per_model(scored, models, lambda s: s.scores)
  hparams = _per_model(scored, models, lambda s: dict(s.scorer.hparams))
  if jax.process_index() == 0:
    results_dir = os.path.join(workdir, 'results')
    summary = report.summarize(rows)  # each set's row and each group's mean
    table = report.write_results(results_dir, summary, id_accuracy,
                                 scores=all_scores, hparams=hparams,
                                 sweeps=_per_model(scored, models, lambda s: s.sweep),
                                 models=trained_with, ids=ids,
                                 changed_settings=changed_settings.load(workdir),
                                 preprocessing=detector_format.preprocessing(config.data,
                                                                             data_source.channels),
                                 compute=vit.compute_record(config.model))
    metrics_log.write_evaluation(workdir, summary, id_accuracy)
    if cfg.plots:
      report.plot_scores(results_dir, all_scores, groups)
      indices = model_part['indices']  # the same sets, in the same order, for every model
      report.plot_extremes(results_dir, all_scores, lambda name, positions: (
          input_pipeline.stored_images(config.data, 'id_test' if name == 'id' else name,
                                       indices[name][positions])), groups)
    print(table)
    logging.info('[evaluate] results in %s', results_dir)
  if cfg.detector.write:  # after the results, so they are kept if this fails; every
    # process, as the params' save is collective
    detector_format.write_from_run(
        os.path.join(workdir, 'detector'), config, rows,
        _per_model(scored, models, lambda s: (s.scorer, s.stats)),
        _per_model(scored, models, lambda s: s.scores['id']),
        lambda model: MODELS[model](config, workdir, placement)[1], replace=True)

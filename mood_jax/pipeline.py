"""The stage list and `run(config, workdir)`: validate everything first, then run stages in order."""

import contextlib
import os

import jax
import ml_collections
from absl import logging

from mood_jax import (changed_settings, config_checks, dry_run, one_class, parallel, run_config,
                      train_eval, train_loop, workdir_lock)
from mood_jax.data import catalogue, data_config
from mood_jax.errors import UserError
from mood_jax.models import vit
from mood_jax.stages import evaluate, finetune, logit_ft, pretrain

# Canonical order; a stage module has NAME and run(config, workdir, mesh). Training
# stages checkpoint under WORKDIR/ckpt/NAME and are skipped once their last step is saved.
STAGES = {stage.NAME: stage for stage in (pretrain, finetune, logit_ft, evaluate)}
TRAINING_STAGES = train_loop.TRAINING_STAGES


def selected_stages(config: ml_collections.ConfigDict) -> list[str]:
  names = [s.strip() for s in config.stages.split(',') if s.strip()]
  if not names:
    config_checks.fail('stages', config.stages, 'selects no stage', 'finetune,evaluate')
  for name in names:
    config_checks.choice('stage', name, list(STAGES))
  return [name for name in STAGES if name in names]


def validate(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Every field the selected stages read, checked before any data is read or anything
  compiled or written; each owner module checks its own fields."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} is an existing file: pass a directory path')
  stages = selected_stages(config)
  depth = vit.parse_variant(config.model.variant)['depth']
  data_config.check_config(config.data)
  vit.check_config(config.model, config.data.image_size)
  mesh = parallel.make_mesh(config.mesh)
  for stage in TRAINING_STAGES:
    if stage not in stages:
      continue
    cfg = config[stage]
    config_checks.training_stage(stage, cfg)
    parallel.check_batch_size(cfg.batch_size // cfg.grad_accum_steps, mesh,
                              f'{stage}.batch_size / grad_accum_steps')
    # A bool in digits.py and a string in the real-data configs: compared, not type-checked.
    config_checks.choice(f'{stage}.augment', cfg.augment, data_config.AUGMENT_CHOICES)
  if 'pretrain' in stages:
    pretrain.check_config(config)
  if 'finetune' in stages:
    train_eval.check_config(config, 'finetune')
  try:  # the data module's own checks: dataset name, classes, OOD set names
    groups = catalogue.source(config.data).ood_groups()
    num_classes = catalogue.source(config.data).num_classes()
  except ValueError as e:
    raise UserError(str(e)) from None
  if 'logit_ft' in stages:
    logit_ft.check_config(config, depth)
    train_eval.check_config(config, 'logit_ft')
  if ('finetune' in stages or 'logit_ft' in stages) and num_classes < 2:
    raise UserError('one-class ID data has no labels to fine-tune on: drop finetune and '
                    'logit_ft from --config.stages and evaluate the pretrain encoder '
                    '(--config.evaluate.models=pretrain), as configs/digits.py:oneclass=C does, '
                    'or give the head every class of the dataset, as MOOD does '
                    '(--config.data.head_all_classes=True)')
  if 'evaluate' in stages:
    if not groups:
      raise UserError('no OOD sets to evaluate: set --config.data.ood_sets')
    config_checks.at_least('evaluate.batch_size', config.evaluate.batch_size, 1, 256)
    parallel.check_batch_size(config.evaluate.batch_size, mesh, 'evaluate.batch_size')
    evaluate.check_config(config, groups)
  # Last, so that a run with other errors too hears of those before a download.
  uses_converted = ('finetune' in stages and config.finetune.init_from not in (
      'pretrain', 'scratch')) or (
      'evaluate' in stages and 'converted' in config.evaluate.models.split(','))
  if uses_converted and not config.dry_run:  # a dry run reads no weights
    finetune.check_converted(config)
  return stages


def run(config: ml_collections.ConfigDict, workdir: str,
        allow_changed_settings: bool = False) -> None:
  """Runs the selected stages in `workdir`, which no other run may hold (workdir_lock);
  `allow_changed_settings`: go on from checkpoints made under other settings
  (changed_settings.py)."""
  if config.one_class_each:
    run_one_class_each(config, workdir, allow_changed_settings)
    return
  stages = validate(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  if config.dry_run:
    print(dry_run.table(dry_run.compile_steps(config, stages, mesh), mesh))
    return
  with workdir_lock.held(workdir):
    changed_settings.check(config, workdir, [s for s in stages if s in TRAINING_STAGES],
                           allow_changed_settings)
    run_config.write(workdir, config)  # after the check: a refused run leaves the last record
    catalogue.source(config.data).prepare()
    for name in stages:
      if name in TRAINING_STAGES and train_loop.final_step(workdir, name) == config[name].num_steps:
        logging.info('[%s] skipped: its final checkpoint (step %d) is already in %s', name,
                     config[name].num_steps, train_loop.checkpoint_dir(workdir, name))
        continue
      logging.info('[%s] starting (%d devices, mesh %s)', name, jax.device_count(),
                   dict(mesh.shape))
      STAGES[name].run(config, workdir, mesh)


def run_one_class_each(config: ml_collections.ConfigDict, workdir: str,
                       allow_changed_settings: bool = False) -> None:
  """`run` once per class as the only ID class, then the mean over classes (one_class.py)."""
  if len(catalogue.source(config.data).all_classes()) < 2:
    raise UserError('one_class_each needs a dataset of two or more classes')
  configs = one_class.class_configs(config)
  for label, class_config in configs.items():  # every run's config is checked before any runs
    validate(class_config, one_class.class_workdir(workdir, label))
  # A dry run writes nothing, the workdir included.
  with contextlib.nullcontext() if config.dry_run else workdir_lock.held(workdir):
    if not config.dry_run:  # each class's run writes its own config.json too
      run_config.write(workdir, config)
    for label, class_config in configs.items():
      logging.info('[one-class] class %s of %s', label, list(configs))
      run(class_config, one_class.class_workdir(workdir, label), allow_changed_settings)
    if not config.dry_run and jax.process_index() == 0:
      table = one_class.write_mean(workdir, list(configs))
      print(f'Mean over the one-class runs of classes {", ".join(map(str, configs))}:\n{table}')

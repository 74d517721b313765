"""The stage list and `run(config, workdir)`: validate everything first, then run stages in order."""

import os

import jax
import ml_collections
from absl import logging

from mood_jax import dry_run, one_class, parallel, run_config, train_eval, train_loop
from mood_jax.data import input_pipeline
from mood_jax.errors import UserError
from mood_jax.models import vit
from mood_jax.stages import evaluate, finetune, logit_ft, pretrain

# Canonical order; a stage module has NAME and run(config, workdir, mesh). Training
# stages checkpoint under WORKDIR/ckpt/NAME and are skipped once their last step is saved.
STAGES = {stage.NAME: stage for stage in (pretrain, finetune, logit_ft, evaluate)}
TRAINING_STAGES = train_loop.TRAINING_STAGES


def _choice(what: str, value: str, valid) -> None:
  if value not in valid:
    raise UserError(f'unknown {what} {value!r}: valid choices are {", ".join(valid)}')


def selected_stages(config: ml_collections.ConfigDict) -> list[str]:
  names = [s.strip() for s in config.stages.split(',') if s.strip()]
  for name in names:
    _choice('stage', name, list(STAGES))
  return [name for name in STAGES if name in names]


def validate(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Checks that need no data or compilation, so a bad run fails before touching anything."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} is an existing file: pass a directory path')
  stages = selected_stages(config)
  depth = vit.parse_variant(config.model.variant)['depth']
  _choice('model.posemb', config.model.posemb, ['learn', 'sincos2d', 'none'])
  _choice('model.pool', config.model.pool, ['mean', 'cls'])
  _choice('model.dtype', config.model.dtype, list(vit.DTYPES))
  for stage in TRAINING_STAGES:
    if stage not in stages:
      continue
    if config[stage].grad_accum_steps < 1:
      raise UserError(f'{stage}.grad_accum_steps={config[stage].grad_accum_steps}: use 1 (no '
                      'accumulation) or more')
    # A bool in digits.py and a string in the real-data configs: compared, not type-checked.
    if config[stage].augment not in input_pipeline.AUGMENT_CHOICES:
      raise UserError(f'unknown {stage}.augment {config[stage].augment!r}: valid choices are '
                      f'{", ".join(map(str, input_pipeline.AUGMENT_CHOICES))}')
  _choice('model.qkv_bias', config.model.qkv_bias, ['qkv', 'qv', 'none'])
  _choice('model.rel_pos_bias', config.model.rel_pos_bias, ['none', 'block', 'shared'])
  if 'pretrain' in stages:
    _choice('pretrain.scheme', config.pretrain.scheme, ['random', 'blockwise'])
    if config.pretrain.scheme == 'random' and config.model.rel_pos_bias != 'none':
      raise UserError('model.rel_pos_bias needs every patch in the encoder, which MAE-style '
                      'random masking drops: use --config.pretrain.scheme=blockwise')
  if 'finetune' in stages:
    train_eval.check_config(config, 'finetune')
  try:  # the data module's own checks: dataset name, classes, OOD set names
    groups = input_pipeline.ood_groups(config.data)
    num_classes = input_pipeline.num_classes(config.data)
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
    evaluate.check_config(config, groups)
  uses_converted = ('finetune' in stages and config.finetune.init_from not in (
      'pretrain', 'scratch')) or (
      'evaluate' in stages and 'converted' in config.evaluate.models.split(','))
  if uses_converted and not config.dry_run:  # a dry run reads no weights
    finetune.check_converted(config)
  return stages


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if config.one_class_each:
    run_one_class_each(config, workdir)
    return
  stages = validate(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  for stage in TRAINING_STAGES:
    if stage in stages:
      cfg = config[stage]
      if cfg.batch_size % cfg.grad_accum_steps:
        raise UserError(f'{stage}.batch_size={cfg.batch_size} does not split into '
                        f'{stage}.grad_accum_steps={cfg.grad_accum_steps} equal micro-batches: '
                        'use a divisor of the batch size')
      parallel.check_batch_size(cfg.batch_size // cfg.grad_accum_steps, mesh,
                                f'{stage}.batch_size / grad_accum_steps')
  parallel.check_batch_size(config.evaluate.batch_size, mesh, 'evaluate.batch_size')
  if config.dry_run:
    print(dry_run.table(dry_run.compile_steps(config, stages, mesh), mesh))
    return
  os.makedirs(workdir, exist_ok=True)
  run_config.write(workdir, config)
  input_pipeline.prepare(config.data)
  for name in stages:
    if name in TRAINING_STAGES and train_loop.final_step(workdir, name) == config[name].num_steps:
      logging.info('[%s] skipped: its final checkpoint (step %d) is already in %s', name,
                   config[name].num_steps, train_loop.checkpoint_dir(workdir, name))
      continue
    logging.info('[%s] starting (%d devices, mesh %s)', name, jax.device_count(),
                 dict(mesh.shape))
    STAGES[name].run(config, workdir, mesh)


def run_one_class_each(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`run` once per class as the only ID class, then the mean over classes (one_class.py)."""
  if len(input_pipeline.all_classes(config.data)) < 2:
    raise UserError('one_class_each needs a dataset of two or more classes')
  configs = one_class.class_configs(config)
  for label, class_config in configs.items():  # every run's config is checked before any runs
    validate(class_config, one_class.class_workdir(workdir, label))
  if not config.dry_run:  # each class's run writes its own config.json too
    os.makedirs(workdir, exist_ok=True)
    run_config.write(workdir, config)
  for label, class_config in configs.items():
    logging.info('[one-class] class %s of %s', label, list(configs))
    run(class_config, one_class.class_workdir(workdir, label))
  if not config.dry_run and jax.process_index() == 0:
    table = one_class.write_mean(workdir, list(configs))
    print(f'Mean over the one-class runs of classes {", ".join(map(str, configs))}:\n{table}')

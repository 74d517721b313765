"""The stage list and `run(config, workdir)`: validate everything first, then run stages in order."""

import contextlib
import os

import jax
import ml_collections
from absl import logging

from mood_jax import config_checks, parallel, stages as all_stages, watchdog
from mood_jax.run import config_json, dry_run, one_class, workdir_lock
from mood_jax.train import changed_settings, checkpoint, optim, utilisation
from mood_jax.data import catalogue, data_config
from mood_jax.errors import UserError
from mood_jax.models import vit
from mood_jax.stages import finetune

STAGES = all_stages.ALL
# A training stage is skipped once its last step is saved.
TRAINING_STAGES = all_stages.TRAINING


def selected_stages(config: ml_collections.ConfigDict) -> list[str]:
  names = [s.strip() for s in config.stages.split(',') if s.strip()]
  if not names:
    config_checks.fail('stages', config.stages, 'selects no stage', 'finetune,evaluate')
  for name in names:
    config_checks.choice('stage', name, list(STAGES))
  return [name for name in STAGES if name in names]


def _check_training_stage(config: ml_collections.ConfigDict, name: str, mesh) -> None:
  """The fields every training stage reads (the loop, the optimizer, the data)."""
  cfg = config[name]
  config_checks.training_stage(name, cfg)
  optim.check_config(name, cfg)
  parallel.check_batch_size(cfg.batch_size // cfg.grad_accum_steps, mesh,
                            f'{name}.batch_size / grad_accum_steps')
  # A bool in digits.py and a string in the real-data configs: compared, not type-checked.
  config_checks.choice(f'{name}.augment', cfg.augment, data_config.AUGMENT_CHOICES)


def validate(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Every field the selected stages read, checked before any data is read or anything
  compiled or written; each owner module checks its own fields."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} is an existing file: pass a directory path')
  stages = selected_stages(config)
  data_config.check_config(config.data)
  vit.check_config(config.model, config.data.image_size)
  utilisation.parse_profile_steps(config.profile_steps)
  mesh = parallel.make_mesh(config.mesh)
  try:  # the data module's own checks: dataset name, classes, OOD set names
    data_source = catalogue.source(config.data)
    data_source.ood_groups()
    data_source.num_classes()
  except ValueError as e:
    raise UserError(str(e)) from None
  if not config.dry_run:  # before the workdir's lock: a run that cannot read leaves nothing
    data_source.check_prepared()
  for name in stages:
    if name in TRAINING_STAGES:
      _check_training_stage(config, name, mesh)
    STAGES[name].check_config(config)
  if 'evaluate' in stages:
    parallel.check_batch_size(config.evaluate.batch_size, mesh, 'evaluate.batch_size')
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
  placement = parallel.Placement.from_config(config)
  if config.dry_run:
    config = dry_run.for_target(config)
    print(dry_run.table(dry_run.compile_steps(config, stages, placement), placement.mesh,
                        config))
    return
  with workdir_lock.held(workdir):
    changed_settings.check(config, workdir, [s for s in stages if s in TRAINING_STAGES],
                           allow_changed_settings)
    config_json.write(workdir, config)  # after the check: a refused run leaves the last record
    catalogue.source(config.data).prepare()
    with watchdog.watching(config.stall_timeout_s):
      _run_stages(config, workdir, placement, stages)


def _run_stages(config: ml_collections.ConfigDict, workdir: str, placement, stages) -> None:
  for name in stages:
    if (name in TRAINING_STAGES
        and checkpoint.final_step(workdir, name) == config[name].num_steps):
      logging.info('[%s] skipped: its final checkpoint (step %d) is already in %s', name,
                   config[name].num_steps, checkpoint.checkpoint_dir(workdir, name))
      continue
    logging.info('[%s] starting (%d devices, mesh %s)', name, jax.device_count(),
                 dict(placement.mesh.shape))
    watchdog.beat(f'the start of {name}', compiling=True)  # a restore, an init
    if name in TRAINING_STAGES:
      STAGES[name].run(config, workdir, placement,
                       later_images=_later_images(config, workdir, stages, name))
    else:
      STAGES[name].run(config, workdir, placement)


def _later_images(config: ml_collections.ConfigDict, workdir: str, stages: list[str],
                  stage: str) -> int:
  """Images still to train on in the selected training stages after `stage`, for the ETA."""
  later = [name for name in stages[stages.index(stage) + 1:] if name in TRAINING_STAGES]
  return sum((config[name].num_steps - (checkpoint.final_step(workdir, name) or 0))
             * config[name].batch_size for name in later)


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
      config_json.write(workdir, config)
    for label, class_config in configs.items():
      logging.info('[one-class] class %s of %s', label, list(configs))
      run(class_config, one_class.class_workdir(workdir, label), allow_changed_settings)
    if not config.dry_run and jax.process_index() == 0:
      table = one_class.write_mean(workdir, list(configs))
      print(f'Mean over the one-class runs of classes {", ".join(map(str, configs))}:\n{table}')

"""Settings changed under a workdir: the run's config against the one saved with each
training stage's checkpoints.

A stage that is skipped (finished) or resumed keeps what it computed under the saved
settings, so a field that changes what the stage computes stops the run, listing each such
field, unless `--allow_changed_settings` is given: then the run goes on, and
WORKDIR/changed_settings.json (each such run, and every later one, with its command and its
differences) and results.json (the latest run's) record which stages ran under which other
settings. Fields that change only evaluation, logging, checkpoint cadence, placement or
speed pass.
"""

import datetime
import json
import os

import jax
import ml_collections
from absl import logging

from mood_jax import files
from mood_jax.errors import UserError
from mood_jax.run import config_json  # the run's command line, recorded per run
from mood_jax.train import checkpoint

RECORD_FILE = 'changed_settings.json'

# What a training stage computes depends on its own config section and on these shared
# fields, less the ones below. model.remat changes memory, not the result; the data fields
# are read by evaluate only, or say where and how fast data is read (eval_crop_fraction is
# not among them: logit_ft's gamma may read ID train through the eval transforms). mesh and
# sharding_rules are not compared either: they change placement, and the result only up to
# float rounding (docs/sharding.md); so does model.attention (tests/test_attention.py).
_SHARED = ('seed', 'model.', 'data.')
_PASS = ('model.remat', 'model.attention', 'data.data_dir', 'data.num_workers', 'data.ood_sets',
         'data.validation_ood_sets', 'data.ood_examples_per_set',
         'data.heldout_validation_classes')
# Evaluation during training (periodic_eval.py) only watches: it changes no param.
_STAGE_PASS = ('log_every', 'ckpt_every', 'keep_checkpoints', 'eval_every', 'eval_scorer')


def flat(tree: dict, prefix: str = '') -> dict:
  """{'a.b': value} of a nested dict."""
  fields = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      fields.update(flat(value, f'{prefix}{key}.'))
    else:
      fields[f'{prefix}{key}'] = value
  return fields


def _computes(field: str, stage: str) -> bool:
  """Whether `field` changes what training stage `stage` computes."""
  if field.startswith(f'{stage}.'):
    return field.split('.', 1)[1] not in _STAGE_PASS
  return field not in _PASS and any(field == s or field.startswith(s) for s in _SHARED)


def differences(saved: dict, current: dict, stage: str) -> list[str]:
  """'field: saved -> current' for each field that changes what `stage` computes; `current`
  goes through JSON as the saved config did (tuples become lists)."""
  saved, current = flat(saved), flat(json.loads(json.dumps(current)))
  return [f'{field}: {saved.get(field, "(unset)")!r} -> {current.get(field, "(unset)")!r}'
          for field in sorted(set(saved) | set(current))
          if _computes(field, stage) and saved.get(field) != current.get(field)]


def _saved_config(workdir: str, stage: str) -> dict | None:
  """The config saved with the stage's latest checkpoint; None if none or unreadable (the
  stage's resume handles an unreadable one)."""
  step = checkpoint.final_step(workdir, stage)
  if step is None:
    return None
  with checkpoint.manager(checkpoint.checkpoint_dir(workdir, stage)) as mngr:
    try:
      return checkpoint.saved_config(mngr, step)
    except Exception:  # orbax and json raise many types for a damaged file
      return None


def _runs(workdir: str) -> list[dict]:
  """The record's runs, oldest first (a record from before there were runs is one run)."""
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    record = json.load(f)
  return record['runs'] if 'runs' in record else [{'changed': record}]


def load(workdir: str) -> dict:
  """{stage: [differences]} of the stages that the latest run went on from under other
  settings, or {}."""
  runs = _runs(workdir)
  return runs[-1]['changed'] if runs else {}


def _record(workdir: str, changed: dict) -> None:
  """Adds this run, with its differences (none too, once there is a record: the latest run
  is then seen to have none), to WORKDIR/changed_settings.json."""
  runs = _runs(workdir)
  if jax.process_index() != 0 or not (changed or runs):
    return
  started = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
  runs.append({'started': started, 'command': config_json.command(), 'changed': changed})
  files.write_atomically(os.path.join(workdir, RECORD_FILE),
                          (json.dumps({'runs': runs}, indent=2) + '\n').encode())


def check(config: ml_collections.ConfigDict, workdir: str, stages: list[str],
          allow: bool) -> None:
  """UserError if one of the training `stages` has checkpoints saved under settings that
  change what it computes; with `allow`, logs and records them instead."""
  changed = {}
  for stage in stages:
    saved = _saved_config(workdir, stage)
    if saved is not None:
      diff = differences(saved, config.to_dict(), stage)
      if diff:
        changed[stage] = diff
  if changed:
    listing = '; '.join(f'{stage}: {", ".join(diff)}' for stage, diff in changed.items())
    if not allow:
      raise UserError(
          f'the checkpoints in {workdir} were made under other settings ({listing}): rerun '
          'with the saved settings, use a new workdir, or pass --allow_changed_settings to go '
          'on from them (results.json then records it)')
    logging.warning('going on from checkpoints made under other settings (%s); recorded in %s',
                    listing, os.path.join(workdir, RECORD_FILE))
  _record(workdir, changed)

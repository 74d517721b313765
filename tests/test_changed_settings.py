"""WORKDIR/changed_settings.json: each run that went on under other settings, and every later
one, under its own entry (tests/test_cli.py runs the command line through it)."""

import json
import os
import runpy

import pytest

from mood_jax.train import changed_settings
from mood_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**finetune):
  config = runpy.run_path(os.path.join(REPO, 'configs', 'digits.py'))['get_config']('smoke')
  config.finetune.update(finetune)
  return config


def test_each_run_is_recorded_under_itself_and_the_latest_is_what_results_report(
    tmp_path, monkeypatch):
  saved = json.loads(json.dumps(_config().to_dict()))  # as the checkpoints keep it
  monkeypatch.setattr(changed_settings, '_saved_config', lambda workdir, stage: saved)
  workdir = str(tmp_path)
  changed_settings.check(_config(), workdir, ['finetune'], allow=False)  # the same: no record
  assert not os.path.exists(tmp_path / changed_settings.RECORD_FILE)
  with pytest.raises(UserError, match='finetune.lr: 0.002 -> 0.01'):
    changed_settings.check(_config(lr=0.01), workdir, ['finetune'], allow=False)
  changed_settings.check(_config(lr=0.01), workdir, ['finetune'], allow=True)
  assert changed_settings.load(workdir) == {'finetune': ['finetune.lr: 0.002 -> 0.01']}
  changed_settings.check(_config(label_smoothing=0.2), workdir, ['finetune'], allow=True)
  changed_settings.check(_config(), workdir, ['finetune'], allow=False)
  assert changed_settings.load(workdir) == {}  # the latest run went on under the saved ones
  with open(tmp_path / changed_settings.RECORD_FILE) as f:
    runs = json.load(f)['runs']
  assert [run['changed'] for run in runs] == [
      {'finetune': ['finetune.lr: 0.002 -> 0.01']},
      {'finetune': ['finetune.label_smoothing: 0.1 -> 0.2']}, {}]
  assert all(run['command'].startswith('python -m mood_jax.main') and run['started']
             for run in runs)


def test_a_record_from_before_runs_reads_as_one_run(tmp_path):
  (tmp_path / changed_settings.RECORD_FILE).write_text('{"finetune": ["finetune.lr: 1 -> 2"]}')
  assert changed_settings.load(str(tmp_path)) == {'finetune': ['finetune.lr: 1 -> 2']}

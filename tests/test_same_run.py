"""What each process runs, compared with process 0's (tests/test_multihost.py has the
two-process run that stops on a difference)."""

import os
import runpy
import shutil

from mood_jax import same_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits(**fields):
  config = runpy.run_path(os.path.join(REPO, 'configs', 'digits.py'))['get_config']('smoke')
  for name, value in fields.items():
    section, _, field = name.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


def test_the_same_command_is_the_same_run():
  assert same_run.differences(same_run.identity(_digits(), 'w'),
                              same_run.identity(_digits(), 'w')) == []


def test_differing_config_fields_and_workdirs_are_named(tmp_path):
  reference = same_run.identity(_digits(), str(tmp_path / 'a'))
  other = same_run.identity(_digits(**{'seed': 3, 'pretrain.lr': 0.5}), str(tmp_path / 'b'))
  assert same_run.differences(reference, other) == [
      'config fields pretrain.lr, seed', f'workdir {tmp_path / "b"} (process 0: {tmp_path / "a"})']


def test_a_changed_code_file_is_code_differs(tmp_path):
  copy = tmp_path / 'mood_jax'
  shutil.copytree(os.path.join(REPO, 'mood_jax'), copy,
                  ignore=shutil.ignore_patterns('__pycache__'))
  assert same_run.code_digest([str(copy)]) == same_run.code_digest([os.path.join(REPO, 'mood_jax')])
  with open(copy / 'errors.py', 'a') as f:
    f.write('# one more line\n')
  changed = {**same_run.identity(_digits(), 'w'), 'code': same_run.code_digest([str(copy)])}
  assert same_run.differences(same_run.identity(_digits(), 'w'), changed) == ['code differs']

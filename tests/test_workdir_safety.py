"""One run per workdir, the settings check against the saved config, and one-line errors for
file-system faults and damaged data: the parts that need no training run (test_cli.py has
the ones through the command line on a trained workdir)."""

import errno
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from configs import digits
from mood_jax import main
from mood_jax.run import workdir_lock
from mood_jax.train import changed_settings
from mood_jax.data import catalogue, input_pipeline
from mood_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_process_is_refused_with_the_holders_name(tmp_path, caplog):
  workdir = str(tmp_path / 'workdir')
  holder = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(f'''
          import sys, time
          from mood_jax.run import workdir_lock
          with workdir_lock.held({workdir!r}):
            print('held', flush=True)
            time.sleep(120)''')],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(UserError, match=rf'workdir {workdir} is in use by another run \(host '
                                        rf'\S+, pid {holder.pid}, started 20'):
      with workdir_lock.held(workdir):
        pass
  finally:
    holder.kill()
    holder.wait()
  # The kernel dropped the killed holder's lock: the next run takes it over and says so.
  with caplog.at_level(logging.WARNING), workdir_lock.held(workdir):
    assert f'took over the lock of a run that stopped without releasing it (host ' in caplog.text
    assert f'pid {holder.pid}, started' in caplog.text
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
      assert f'pid {os.getpid()}' in f.read()
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
    assert f.read() == ''  # a clean exit leaves it free and unnamed


def test_only_fields_that_change_a_stage_stop_it():
  saved = json.loads(json.dumps(digits.get_config('smoke').to_dict()))  # as checkpoints hold it
  config = digits.get_config('smoke')
  config.evaluate.scorers = 'msp'      # evaluation only
  config.finetune.log_every = 1        # logging only
  config.model.remat = True            # memory only
  config.data.ood_sets = ('photos',)   # read by evaluate only
  config.logit_ft.lr = 0.1             # another stage's
  assert changed_settings.differences(saved, config.to_dict(), 'finetune') == []
  config.finetune.lr, config.seed, config.data.id_classes = 0.1, 3, (1, 2)
  assert changed_settings.differences(saved, config.to_dict(), 'finetune') == [
      'data.id_classes: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] -> [1, 2]', 'finetune.lr: 0.002 -> 0.1',
      'seed: 0 -> 3']
  assert changed_settings.differences(saved, config.to_dict(), 'pretrain') == [
      'data.id_classes: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] -> [1, 2]', 'seed: 0 -> 3']


@pytest.mark.parametrize('error,line', [
    (OSError(errno.EROFS, 'Read-only file system', '/data/w/ckpt'),
     'Read-only file system: /data/w/ckpt: the file system is read-only: use a writable'),
    (PermissionError(errno.EACCES, 'Permission denied', '/data/w'),
     'Permission denied: /data/w: permission denied'),
    (OSError(errno.ENOSPC, 'No space left on device', '/data/w/metrics.jsonl'),
     'No space left on device: /data/w/metrics.jsonl: the disk is full: free space and rerun'),
    # tensorstore, under orbax, names the cause in the text of its own exception types
    (ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT: [OS error: No space left on '
                'device]'), 'ValueError: RESOURCE_EXHAUSTED: Error writing'),
])
def test_file_system_errors_are_one_line_with_path_and_fix(error, line):
  message = main.file_system_error(error)
  assert message.startswith(line) and '\n' not in message


def test_a_bug_is_not_taken_for_a_file_system_error():
  assert main.file_system_error(ZeroDivisionError('division by zero')) is None
  assert main.file_system_error(OSError(errno.EBADF, 'Bad file descriptor')) is None


@pytest.fixture(scope='module')
def prepared_smoke_data(tmp_path_factory):
  config = digits.get_config('smoke')
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  catalogue.source(config.data).prepare()
  return config.data


def _train_file(data_cfg) -> str:
  directory = os.path.join(data_cfg.data_dir, 'mood_digits')
  for root, _, files in os.walk(directory):
    for name in files:
      if '-train.array_record' in name:
        return os.path.join(root, name)
  raise AssertionError(f'no train file under {directory}')


@pytest.mark.parametrize('damage', ['flipped', 'truncated'])
def test_damaged_array_record_names_set_record_and_rebuild(prepared_smoke_data, damage):
  path = _train_file(prepared_smoke_data)
  with open(path, 'rb') as f:
    intact = f.read()
  try:
    with open(path, 'wb') as f:
      f.write(bytes(b ^ 0xff for b in intact[:2000]) + intact[2000:] if damage == 'flipped'
              else intact[:len(intact) // 2])
    batches, _ = input_pipeline.eval_dataset(prepared_smoke_data, 'id_train',
                                             global_batch_size=64)
    with pytest.raises(UserError) as error:
      for _ in batches:
        pass
    assert re.fullmatch(r'id_train: record \d+ in .*mood_digits.* cannot be read '
                        r'\(RuntimeError: .*\): its files are damaged. Move .* aside and '
                        r'rerun: it is rebuilt', str(error.value).split(main._GRAIN_NOTE)[0])
  finally:
    with open(path, 'wb') as f:
      f.write(intact)


def test_preparation_removes_what_a_killed_one_left(prepared_smoke_data, tmp_path):
  data = prepared_smoke_data.copy_and_resolve_references()
  data.data_dir = str(tmp_path)
  config_dir = os.path.join(str(tmp_path), 'mood_digits',
                            catalogue.source(data).locate('id_train').config.name)
  leftover = os.path.join(config_dir, 'incomplete.1234.1.0.0')
  os.makedirs(leftover)
  with open(os.path.join(leftover, 'half.array_record'), 'w') as f:
    f.write('partial')
  catalogue.source(data).prepare()
  assert sorted(os.listdir(config_dir)) == ['.prepare.lock', '1.0.0']

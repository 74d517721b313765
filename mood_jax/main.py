"""Command line: python -m mood_jax.main --config=configs/digits.py --workdir=DIR [--config.x=y]."""

import errno
import logging as std_logging
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mood_jax import parallel
from mood_jax.errors import UserError, error_line
from mood_jax.run import allocator, workdir_lock

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.mark_flags_as_required(['config', 'workdir'])
# Multi-process runs under SLURM, Open MPI or on Cloud TPU VMs need none of these.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 to num_processes - 1.')
_ALLOW_CHANGED_SETTINGS = flags.DEFINE_bool(
    'allow_changed_settings', False, 'Go on from checkpoints in the workdir made under other '
    'settings (results.json records it) instead of stopping.')


_GRAIN_NOTE = '\n--------------------\nFor simplicity, Grain'
# A damaged checkpoint (which the training loop reports and skips) fails to restore at its
# first unreadable array; the reads orbax left running then fail too, into its closed event
# loop, one error each, hundreds in all.
_ABANDONED_READS = ('Future exception was never retrieved', 'Task exception was never retrieved')


class QuietLibraries(std_logging.Filter):
  """INFO lines from mood_jax only (orbax alone logs ~30 per checkpoint save), and not
  tfds's warning on every read of a dataset whose config is made from ours, nor asyncio's
  for abandoned reads, nor orbax's tracebacks of a failed save (a full disk: four, ~100
  lines each), whose error reaches `main` anyway, which reports it in one line."""
  package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep

  def filter(self, record) -> bool:
    if record.pathname.startswith(self.package_dir):
      return True
    if record.exc_info and f'{os.sep}orbax{os.sep}' in record.pathname:
      return False
    return (record.levelno >= std_logging.WARNING and not record.getMessage().startswith(
        ('Using custom data configuration', *_ABANDONED_READS)))


def quiet_abandoned_reads(unraisable) -> None:
  """sys.unraisablehook without the abandoned reads' errors from tensorstore's threads."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    sys.__unraisablehook__(unraisable)


def stop(signum, frame) -> None:
  """Outside a training loop (which saves first), a stop signal ends the run at once: it is
  restartable from its checkpoints, prepared data and results, all written atomically.

  By os._exit, not by raising: an exception raised wherever the main thread happens to be
  can leave a lock inside a library's thread pool held, and unwinding then waits on it
  forever (seen in orbax's CheckpointManager, whose executor joins a worker blocked on the
  semaphore lock the interrupted thread took). os.write: stderr's buffered writer may be
  mid-write in the interrupted code."""
  del frame
  from mood_jax.train import loop as train_loop  # noqa: PLC0415 (loaded by main already)
  workdir_lock.release_at_exit()
  os.write(2, f'stopped by {signal.Signals(signum).name}: rerun the same command to resume '
              f'(exit status {train_loop.PREEMPTED_EXIT_CODE})\n'.encode())
  os._exit(train_loop.PREEMPTED_EXIT_CODE)


# The environment, not the program: one line with the path and the fix, no traceback.
_FILE_SYSTEM_HINTS = {
    errno.EROFS: 'the file system is read-only: use a writable directory',
    errno.EACCES: 'permission denied: use a directory you can write, or fix its permissions',
    errno.EPERM: 'permission denied: use a directory you can write, or fix its permissions',
    errno.ENOSPC: 'the disk is full: free space and rerun the same command; it resumes',
    errno.EDQUOT: 'the disk quota is used up: free space and rerun the same command; it resumes',
    errno.ENOTDIR: 'a file stands where a directory is needed: use another path',
    errno.EEXIST: 'a file stands where a directory is needed: use another path',
    errno.ENOENT: 'it does not exist: check the path',
    errno.EIO: 'the device reports an I/O error: check the disk, then rerun',
}


def file_system_error(error: BaseException) -> str | None:
  """One line for a file-system error (also one that orbax or tensorstore wrap into their own
  exception types, naming the cause only in text), or None for any other error."""
  if isinstance(error, OSError) and error.errno in _FILE_SYSTEM_HINTS:
    path = f' {error.filename}' if error.filename else ''
    return f'{os.strerror(error.errno)}:{path}: {_FILE_SYSTEM_HINTS[error.errno]}'
  text = str(error)
  for code in (errno.ENOSPC, errno.EROFS, errno.EACCES):
    if os.strerror(code) in text:
      return f'{error_line(error)}: {_FILE_SYSTEM_HINTS[code]}'
  return None


def parse_flags(argv):
  """absl's parsing, with every bad flag reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # Config-file errors carry the file's traceback as text; its last line is the message.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f'error: {lines[0] if len(lines) == 1 else lines[0] + " " + lines[-1]}')
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    sys.exit(f'error: a --config.* override names a field the config does not have: {e}; '
             'the config file lists the valid fields')


def main(argv) -> None:
  # The program is imported here, not at the top: --help and a bad flag answer at once.
  from mood_jax.run import pipeline  # noqa: PLC0415
  from mood_jax.train import loop as train_loop  # noqa: PLC0415
  logging.get_absl_handler().addFilter(QuietLibraries())
  sys.unraisablehook = quiet_abandoned_reads
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; set config fields as --config.a.b=value')
  config = _CONFIG.value
  if config.dry_run and config.dry_run_devices:
    # Fake devices exist only if asked for before JAX starts a backend; CPU, so that an
    # accelerator's own devices do not count.
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', config.dry_run_devices)
  else:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.default_backend() == 'cpu' and not allocator.caching_malloc():
      logging.info('running on CPU with the C library\'s malloc: preloading tcmalloc makes '
                   'the training steps about 1.2x faster (docs/precision.md)')
  for sig in train_loop.stop_signals():
    signal.signal(sig, stop)
  try:
    pipeline.run(config, _WORKDIR.value, _ALLOW_CHANGED_SETTINGS.value)
  except UserError as e:
    logging.flush()
    # Grain appends a note on its filtered traceback to errors raised under its iterators.
    sys.exit(f'error: {str(e).split(_GRAIN_NOTE)[0]}')
  except train_loop.Preempted as e:
    logging.warning('%s: rerun the same command to resume (exit status %d)', e,
                    train_loop.PREEMPTED_EXIT_CODE)
    logging.flush()
    sys.exit(train_loop.PREEMPTED_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    line = file_system_error(e)
    if line is None:
      raise  # a bug of ours: its traceback helps
    logging.flush()
    sys.exit(f'error: {line}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

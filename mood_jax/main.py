"""Command line: python -m mood_jax.main --config=configs/digits.py --workdir=DIR [--config.x=y]."""

import atexit
import errno
import logging as std_logging
import os
import signal
import sys

import jax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from mood_jax import parallel
from mood_jax.errors import UserError, error_line
from mood_jax.exit_now import PREEMPTED_EXIT_CODE, exit_now
from mood_jax.run import allocator, peer_watch

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
  restartable from its checkpoints, prepared data and results, all written atomically."""
  del frame
  exit_now(f'stopped by {signal.Signals(signum).name}: rerun the same command to resume '
           f'(exit status {PREEMPTED_EXIT_CODE})', PREEMPTED_EXIT_CODE)


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


def _unreadable_config(error: OSError) -> str:
  """ml_collections keeps a config file it cannot read as an error raised by the first use of
  the config: a --config.* override, or `main`."""
  return (f'error: --config: {str(error).strip().splitlines()[-1].strip()}: pass an existing '
          'config file, e.g. --config=configs/digits.py')


def parse_flags(argv):
  """absl's parsing, with every bad flag reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # Config-file errors carry the file's traceback as text; its last line is the message.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f'error: {lines[0] if len(lines) == 1 else lines[0] + " " + lines[-1]}')
  except OSError as e:
    sys.exit(_unreadable_config(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    sys.exit(f'error: a --config.* override names a field the config does not have: {e}; '
             'the config file lists the valid fields')


def _watch_peers(config, workdir: str) -> peer_watch.PeerWatch | None:
  """The peer watch of a multi-process run, marked exited when this process ends through
  Python (atexit runs it before JAX's shutdown barrier, registered earlier)."""
  if jax.process_count() == 1:
    return None
  from mood_jax import stages  # noqa: PLC0415 (the program, imported by main)
  from mood_jax.train import checkpoint  # noqa: PLC0415
  watch = peer_watch.PeerWatch(
      ocp.multihost.get_jax_distributed_client(), jax.process_index(), jax.process_count(),
      config.peer_timeout_s, lambda: checkpoint.last_saved(workdir, stages.TRAINING),
      coordinator=_COORDINATOR.value or 'the coordinator').start()
  atexit.register(watch.stop)
  return watch


def _end(watch: peer_watch.PeerWatch | None, line: str, status: int):
  """Exits with `line` on stderr: in a multi-process run by the peer watch's `leave`, past
  JAX's shutdown barrier, where peers that ended otherwise would hold it up, then abort."""
  if watch is None:
    logging.flush()
    sys.exit(line if status == 1 else status)
  watch.leave(line, status)


def main(argv) -> None:
  # The program is imported here, not at the top: --help and a bad flag answer at once.
  from mood_jax import same_run  # noqa: PLC0415
  from mood_jax.run import pipeline  # noqa: PLC0415
  from mood_jax.train import loop as train_loop  # noqa: PLC0415
  logging.get_absl_handler().addFilter(QuietLibraries())
  sys.unraisablehook = quiet_abandoned_reads
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; set config fields as --config.a.b=value')
  try:
    config = _CONFIG.value
  except OSError as e:
    sys.exit(_unreadable_config(e))
  if config.dry_run and config.dry_run_devices:
    # Fake devices exist only if asked for before JAX starts a backend; CPU, so that an
    # accelerator's own devices do not count.
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', config.dry_run_devices)
  else:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    join_timeout_s=config.coordinator_timeout_s,
                                    peer_timeout_s=config.peer_timeout_s)
    if jax.default_backend() == 'cpu' and not allocator.caching_malloc():
      logging.info('running on CPU with the C library\'s malloc: preloading tcmalloc makes '
                   'the training steps about 1.2x faster (docs/precision.md)')
  watch = _watch_peers(config, _WORKDIR.value)
  for sig in train_loop.stop_signals():
    signal.signal(sig, stop)
  try:
    if watch is not None:
      same_run.check(ocp.multihost.get_jax_distributed_client(), jax.process_index(),
                     jax.process_count(), config, _WORKDIR.value, config.coordinator_timeout_s)
    pipeline.run(config, _WORKDIR.value, _ALLOW_CHANGED_SETTINGS.value)
    if watch is None:
      # Done, all written: ended here, not by Python's finalization, which first restores the
      # default signal handlers and then takes seconds to free JAX's backends, so that a stop
      # signal then ended a finished run with 143.
      sys.stdout.flush()
      sys.stderr.flush()
      exit_now('', 0)
  except UserError as e:
    # Grain appends a note on its filtered traceback to errors raised under its iterators.
    _end(watch, f'error: {str(e).split(_GRAIN_NOTE)[0]}', 1)
  except train_loop.Preempted as e:
    logging.warning('%s: rerun the same command to resume (exit status %d)', e,
                    PREEMPTED_EXIT_CODE)
    _end(watch, '', PREEMPTED_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    line = file_system_error(e)
    if line is not None:
      _end(watch, f'error: {line}', 1)
    # A collective that failed since a peer is gone (gloo: "Connection closed by peer"): the
    # watch names it, in at most peer_timeout_s.
    verdict = watch and watch.wait_for_verdict()
    if verdict:
      _end(watch, verdict, PREEMPTED_EXIT_CODE)
    raise  # a bug of ours: its traceback helps


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

"""One orbax CheckpointManager per stage: train state, data-iterator state, config, topology.

Resuming reads the newest checkpoint that can be read. Newer ones that cannot (a truncated
or missing file) are moved aside to `<step>.unreadable-<time>`: kept for inspection and
named in the log, never deleted, and out of the way of retention (which would otherwise
count them and delete good ones) and of the rerun's own save of that step.

The data-iterator state is per process, so a checkpoint resumes only on as many processes
as wrote it; its mesh shape and device count may differ.
"""

import os
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from mood_jax.errors import UserError


def manager(directory: str, cfg: ml_collections.ConfigDict | None = None,
            keep_steps: tuple[int, ...] = ()) -> ocp.CheckpointManager:
  """The manager of a stage's checkpoints: one that saves, with a stage config `cfg`
  (its latest `keep_checkpoints` kept, and those of `keep_steps`), or one to read with
  (orbax's read_only logs warnings)."""
  if cfg is None:
    options = ocp.CheckpointManagerOptions(create=False)
  else:
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(cfg.keep_checkpoints), policies.CustomSteps(keep_steps)]),
        cleanup_tmp_directories=True)  # unfinished saves of a killed run
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler(),
                     'topology': ocp.JsonCheckpointHandler()})


def _topology() -> dict:
  return {'process_count': jax.process_count(), 'device_count': jax.device_count()}


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter,
         config: ml_collections.ConfigDict) -> None:
  """Async save; callers must `mngr.wait_until_finished()` before exiting."""
  mngr.save(step, force=True, args=ocp.args.Composite(  # force: the training loop decides when
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict()),
      topology=ocp.args.JsonSave(_topology())))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
  """Restore the state into `abstract_state` (its shardings decide placement).

  With `data_iter`, its position is restored in place too.
  """
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items)).state


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The config the run that saved `step` had."""
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def saved_abstract_state(mngr: ocp.CheckpointManager, step: int, sharding):
  """The saved state's shapes and dtypes (a nested dict), every array placed by `sharding`."""
  saved = mngr.item_metadata(step)['state'].tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)


def _check_topology(mngr: ocp.CheckpointManager, step: int) -> None:
  saved = mngr.restore(step, args=ocp.args.Composite(topology=ocp.args.JsonRestore())).topology
  now = _topology()
  if saved['process_count'] != now['process_count']:
    raise UserError(
        f'checkpoint {mngr.directory / str(step)} was written by {saved["process_count"]} '
        f'processes, this run has {now["process_count"]}: its data-iterator state is per '
        f'process. Rerun with {saved["process_count"]} processes, or start the stage afresh '
        'in a new workdir')
  if saved['device_count'] != now['device_count']:
    logging.info('restoring a checkpoint saved on %d devices onto %d', saved['device_count'],
                 now['device_count'])


def error_line(error: Exception, max_chars: int = 300) -> str:
  """The exception's type and the start of its first line: tensorstore's run to pages."""
  line = (str(error).strip().splitlines() or [''])[0]
  return f'{type(error).__name__}: {line[:max_chars]}{"..." if len(line) > max_chars else ""}'


def _move_aside(mngr: ocp.CheckpointManager, unreadable: list, resumed_step: int) -> None:
  """Renames unreadable checkpoints so that they are kept but no longer count as steps."""
  stamp = time.strftime('%Y%m%d-%H%M%S')
  for step, error in unreadable:
    path = mngr.directory / str(step)
    aside = mngr.directory / f'{step}.unreadable-{stamp}'
    if jax.process_index() == 0:  # a shared directory: one process renames
      path.rename(aside)
    logging.warning('checkpoint %s cannot be read (%s): moved it to %s, resuming from step %d',
                    path, error_line(error), aside, resumed_step)
  ocp.multihost.sync_global_processes(f'mood_jax: unreadable checkpoints moved aside {stamp}')
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter):
  """The state of the newest readable checkpoint, with `data_iter` moved to its position,
  or None if there is no checkpoint; see the module docstring for unreadable ones."""
  unreadable = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      _check_topology(mngr, step)
      state = restore(mngr, step, abstract_state, data_iter)
    except UserError:
      raise
    except Exception as e:  # orbax, tensorstore and json raise many types for a damaged file
      unreadable.append((step, e))
      continue
    if unreadable:
      _move_aside(mngr, unreadable, step)
    return state
  if unreadable:
    errors = '; '.join(f'step {step}: {error_line(e)}' for step, e in unreadable)
    raise UserError(
        f'no checkpoint in {mngr.directory} can be read ({errors}). If the model config '
        'changed since they were written, rerun with the old one or use a new workdir; if '
        'they are damaged, move them aside to start the stage afresh')
  return None

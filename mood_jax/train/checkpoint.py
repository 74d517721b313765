"""The workdir's checkpoints: one orbax CheckpointManager per training stage under
WORKDIR/ckpt/<stage>, each holding train state, data-iterator state, config and topology;
and the reads of one stage's params by another.

Resuming reads the newest checkpoint that can be read. Newer ones that cannot (a truncated
or missing file) are moved aside to `<step>.unreadable-<time>`: kept for inspection and
named in the log, never deleted, and out of the way of retention (which would otherwise
count them and delete good ones) and of the rerun's own save of that step.

The data-iterator state is per process, so a checkpoint resumes only on as many processes
as wrote it; its mesh shape and device count may differ.
"""

import os
import time
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from mood_jax import parallel
from mood_jax.errors import UserError, error_line


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, 'ckpt', stage)


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
      # The PyTree handler, not the standard one (its wrapper): it can read the params alone.
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler(),
                     'topology': ocp.JsonCheckpointHandler()})


def _topology() -> dict:
  return {'process_count': jax.process_count(), 'device_count': jax.device_count()}


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter,
         config: ml_collections.ConfigDict) -> None:
  """Async save; callers must `mngr.wait_until_finished()` before exiting."""
  mngr.save(step, force=True, args=ocp.args.Composite(  # force: the training loop decides when
      state=ocp.args.PyTreeSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict()),
      topology=ocp.args.JsonSave(_topology())))


def _restore_args(abstract_tree, **options) -> ocp.args.PyTreeRestore:
  """Restore into `abstract_tree`'s structure, shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(
      item=abstract_tree,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree), **options)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
  """Restore the state into `abstract_state` (its shardings decide placement).

  With `data_iter`, its position is restored in place too.
  """
  items = {'state': _restore_args(abstract_state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items)).state


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The config (a nested dict) saved with checkpoint `step`."""
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


def final_step(workdir: str, stage: str) -> int | None:
  """Latest saved step of a stage, or None; reads only the directory listing."""
  path = checkpoint_dir(workdir, stage)
  if not os.path.isdir(path):
    return None
  with manager(path) as mngr:
    return mngr.latest_step()


def last_saved(workdir: str, stages) -> str:
  """'finetune step 40': the newest finished save of the latest of `stages` (in their order)
  that has one, or 'none yet'. From the directory listing alone (orbax's finished steps; a
  save cut off midway is only a temporary directory), with no manager: it has barriers, and
  this is asked when a process of the run may be gone."""
  for stage in reversed(stages):
    path = checkpoint_dir(workdir, stage)
    steps = ocp.path.step.checkpoint_steps(path)  # [] where there is no directory
    if steps:
      return f'{stage} step {max(steps)} in {path}'
  return 'none yet'


def _params(mngr: ocp.CheckpointManager, step: int, abstract_params):
  """The params of checkpoint `step` alone, into `abstract_params` (shapes and shardings);
  the optimizer state is not read."""
  args = _restore_args({'params': abstract_params}, partial_restore=True)
  return mngr.restore(step, args=ocp.args.Composite(state=args)).state['params']


def _read_params(workdir: str, stage: str, abstract: Callable, step: int | None):
  """The params of a finished earlier stage at its final step or `step`;
  `abstract(mngr, step)` gives their shapes and shardings."""
  path = checkpoint_dir(workdir, stage)
  final = final_step(workdir, stage)
  if final is None:
    raise UserError(f'no {stage} checkpoint in {path}: '
                    f'run the {stage} stage first (add it to --config.stages)')
  step = final if step is None else step
  with manager(path) as mngr:
    if step not in mngr.all_steps():
      raise UserError(f'no {stage} checkpoint of step {step} in {path} (kept: '
                      f'{sorted(mngr.all_steps())}): choose a kept step, or rerun {stage} in a '
                      'fresh workdir with the step set, so that it is kept')
    try:
      return _params(mngr, step, abstract(mngr, step))
    except Exception as e:  # orbax, tensorstore and json raise many types for a damaged file
      raise UserError(
          f'cannot restore the {stage} checkpoint {os.path.join(path, str(step))} '
          f'({error_line(e)}). If the model config changed since {stage} ran, use '
          f'the old one; if the checkpoint is damaged, move it aside and rerun {stage}: it '
          'resumes from its previous checkpoint') from e


def restore_params(workdir: str, stage: str, init_params: Callable[[], Any],
                   placement: parallel.Placement, step: int | None = None):
  """Params of a finished earlier stage (e.g. finetune for logit_ft) at its final step or
  `step`, placed by `placement`; their shapes must be those `init_params` makes."""
  abstract = placement.placed(jax.eval_shape(init_params))
  return _read_params(workdir, stage, lambda mngr, step: abstract, step)


def saved_params(workdir: str, stage: str, placement: parallel.Placement) -> dict:
  """Params of a finished earlier stage as saved (shapes from the checkpoint), placed by
  `placement`: for a hand-off that adapts them to another model."""
  def abstract(mngr, step):
    saved = saved_abstract_state(mngr, step, parallel.replicated(placement.mesh))['params']
    return placement.placed(saved)
  return _read_params(workdir, stage, abstract, None)

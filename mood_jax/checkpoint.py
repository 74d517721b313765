"""One orbax CheckpointManager per stage: train state, data-iterator state and config."""

import os

import grain
import ml_collections
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter,
         config: ml_collections.ConfigDict) -> None:
  """Async save; callers must `mngr.wait_until_finished()` before exiting."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict())))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
  """Restore the state into `abstract_state` (its shardings decide placement).

  With `data_iter`, its position is restored in place too.
  """
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items)).state

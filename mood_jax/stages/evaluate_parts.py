"""The evaluate stage's finished parts, kept under WORKDIR/evaluate_parts/ as they finish: each
(model, scorer)'s scores, metric rows, hparams, sweep and fitted stats, and each model's ID
accuracy and example ids. A stopped evaluation resumes from them instead of starting over. A
part is used only under the config, code and model checkpoint it was made with (its key).

Pickles, written atomically by process 0: the stats are any scorer's pytree of arrays, and
only this program reads them back, from its own workdir.
"""

import hashlib
import json
import os
import pickle

import jax
import ml_collections
import orbax.checkpoint as ocp

from mood_jax import files, same_run
from mood_jax.train import checkpoint

DIR = 'evaluate_parts'
_MODEL = '_model'  # the file name of a model's own part (no scorer is named so)


def _key(config: ml_collections.ConfigDict, workdir: str, model: str) -> str:
  digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
  digest.update(same_run.code_digest().encode())
  digest.update(checkpoint.last_saved(workdir, [model]).encode())  # 'none yet': converted
  return digest.hexdigest()


class Parts:
  """The parts of the models `models` that an earlier run of this evaluation finished, read
  once by every process before any process writes one (so that all skip the same ones)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, models: list[str]):
    self._dir = os.path.join(workdir, DIR)
    self._keys = {model: _key(config, workdir, model) for model in models}
    self._found = {}
    for model, key in self._keys.items():
      model_dir = os.path.join(self._dir, model)
      names = os.listdir(model_dir) if os.path.isdir(model_dir) else []
      for name in sorted(n for n in names if not n.startswith('.')):  # .tmp_: a cut write
        try:
          with open(os.path.join(model_dir, name), 'rb') as f:
            part = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError):  # not one of ours: recomputed
          continue
        if part.get('key') == key:
          self._found[(model, name)] = part['value']
    ocp.multihost.sync_global_processes('mood_jax: evaluate parts read')

  def get(self, model: str, scorer: str = _MODEL):
    """The finished part of `model` (its own, or its `scorer`'s), or None."""
    return self._found.get((model, scorer))

  def put(self, model: str, value, scorer: str = _MODEL) -> None:
    """Keeps `value` (a pytree) as a finished part; not one with arrays split over several
    processes (a knn bank on many hosts), which the next run computes again."""
    whole = all(getattr(leaf, 'is_fully_addressable', True) for leaf in jax.tree.leaves(value))
    if jax.process_index() != 0 or not whole:
      return
    os.makedirs(os.path.join(self._dir, model), exist_ok=True)
    files.write_atomically(os.path.join(self._dir, model, scorer), pickle.dumps(
        {'key': self._keys[model], 'value': jax.device_get(value)}))

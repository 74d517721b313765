"""WORKDIR/config.json: the resolved config and the command line of the latest run in the
workdir, written as it starts (checkpoints keep their own copy), so a user sees what ran."""

import json
import os
import shlex
import sys

import jax
import ml_collections

from mood_jax import files

FILE = 'config.json'


def command() -> str:
  """This process's command line, as a user would type it."""
  return shlex.join(['python', '-m', 'mood_jax.main', *sys.argv[1:]])


def write(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json of this run (process 0): its command line and resolved `config`."""
  if jax.process_index() != 0:
    return
  document = {'command': command(), 'config': config.to_dict()}
  files.write_atomically(os.path.join(workdir, FILE),
                         (json.dumps(document, indent=2) + '\n').encode())


def _tuples(value):
  """JSON has lists only; every sequence in our configs is a tuple (see configs/digits.py)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load(path: str) -> ml_collections.ConfigDict:
  """The config a run wrote to `path` (a WORKDIR/config.json)."""
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)['config']))

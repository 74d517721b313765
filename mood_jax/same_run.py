"""Every process of a multi-process run must run the same thing: the same resolved config,
the same code (mood_jax/ and configs/) and the same workdir. Each process puts what it runs
in the coordination service's key-value store at start and compares everyone's with process
0's, before any work; every process sees the same differences, so all stop alike, with one
line naming them."""

import hashlib
import json
import os

import ml_collections

from mood_jax.train import changed_settings
from mood_jax.errors import UserError

_KEY = 'mood_jax/same_run/'
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CODE_DIRS = (_PACKAGE, os.path.join(os.path.dirname(_PACKAGE), 'configs'))


def code_digest(dirs=_CODE_DIRS) -> str:
  """sha256 of the .py files under `dirs`: their paths (relative to each dir) and bytes."""
  digest = hashlib.sha256()
  for root_dir in dirs:
    for root, subdirs, files in os.walk(root_dir):
      subdirs.sort()
      for name in sorted(f for f in files if f.endswith('.py')):
        path = os.path.join(root, name)
        digest.update(os.path.relpath(path, os.path.dirname(root_dir)).encode() + b'\0')
        with open(path, 'rb') as f:
          digest.update(f.read() + b'\0')
  return digest.hexdigest()


def identity(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """What this process runs, as JSON can carry it."""
  return {'config': changed_settings.flat(json.loads(json.dumps(config.to_dict()))),
          'code': code_digest(), 'workdir': os.path.abspath(workdir)}


def differences(reference: dict, other: dict) -> list[str]:
  """How `other` differs from `reference` (identities): the config fields, 'code differs',
  the two workdirs."""
  fields = sorted(field for field in set(reference['config']) | set(other['config'])
                  if reference['config'].get(field) != other['config'].get(field))
  found = [f'config field{"s" if len(fields) > 1 else ""} {", ".join(fields)}'] if fields else []
  if reference['code'] != other['code']:
    found.append('code differs')
  if reference['workdir'] != other['workdir']:
    found.append(f'workdir {other["workdir"]} (process 0: {reference["workdir"]})')
  return found


def check(client, process_id: int, num_processes: int, config: ml_collections.ConfigDict,
          workdir: str, timeout_s: float) -> None:
  """UserError naming what differs from process 0 on each process that differs."""
  client.key_value_set(f'{_KEY}{process_id}', json.dumps(identity(config, workdir)))
  everyone = [json.loads(client.blocking_key_value_get(f'{_KEY}{p}', int(timeout_s * 1000)))
              for p in range(num_processes)]
  found = {p: differences(everyone[0], other) for p, other in enumerate(everyone) if p}
  listing = '; '.join(f'process {p}: {", ".join(diff)}' for p, diff in found.items() if diff)
  if listing:
    raise UserError(f'the processes of this run do not run the same thing ({listing}): start '
                    'every process with the same command line, the same checkout and the same '
                    'workdir')

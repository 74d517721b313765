"""Training metrics: a log line and a row in WORKDIR/metrics.jsonl (process 0 only)."""

import json
import os

import jax
from absl import logging


def write(workdir: str, stage: str, step: int, metrics: dict) -> None:
  if jax.process_index() != 0:
    return
  values = {k: float(v) for k, v in metrics.items()}
  logging.info('[%s] step %d: %s', stage, step,
               ', '.join(f'{k}={v:.4g}' for k, v in values.items()))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'stage': stage, 'step': step, **values}) + '\n')

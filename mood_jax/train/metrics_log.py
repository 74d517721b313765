"""Training metrics: a log line, a row in WORKDIR/metrics.jsonl and TensorBoard scalars in
WORKDIR/tensorboard/<stage>/ (process 0 only); the evaluate stage's results as scalars in
WORKDIR/tensorboard/evaluate/.

metrics.jsonl is the record; the TensorBoard files are a view of it. A stage that resumes from
a checkpoint drops the rows it logged after that checkpoint (it logs those steps again) and
rewrites its TensorBoard run from the rows kept, so every step appears once in both. The
writer is tensorboardX: it writes TensorBoard's event files without TensorFlow.
"""

import json
import os
import shutil

import jax
from absl import logging

from mood_jax import files
from mood_jax.ood import report

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
KINDS = ('train', 'eval')  # a row's kind, and its TensorBoard tag prefix: 'train/loss'


def read(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:  # a line cut off by a kill has no newline: skipped
    return [json.loads(line) for line in f if line.endswith('\n')]


def _write_rows(workdir: str, rows: list[dict]) -> None:
  """Replaces metrics.jsonl by `rows` in one rename, so a crash keeps the old or the new file."""
  files.write_atomically(os.path.join(workdir, METRICS_FILE),
                         ''.join(json.dumps(row) + '\n' for row in rows).encode())


def _tensorboard_writer(run_dir: str, **options):
  """A tensorboardX SummaryWriter, imported here: it imports torch where torch is installed
  (~2 s), which a command that writes no metrics should not wait for."""
  import tensorboardX  # noqa: PLC0415
  return tensorboardX.SummaryWriter(run_dir, **options)


def _add_scalars(writer, row: dict) -> None:
  kind = row.get('kind', 'train')  # rows from before 'kind' existed are training rows
  for name, value in row.items():
    if name not in ('stage', 'kind', 'step'):
      writer.add_scalar(f'{kind}/{name}', value, row['step'])


def write_evaluation(workdir: str, rows: list[dict], id_accuracy: dict[str, float]) -> None:
  """The evaluate stage's metrics beside the training curves, one scalar each at step 0:
  '<model>/<scorer>/<metric>/<OOD set>' (group means as '<group>_mean') and
  '<model>/id_accuracy'. Each evaluate run replaces the last one's, as its results do."""
  if jax.process_index() != 0:
    return
  run_dir = os.path.join(workdir, TENSORBOARD_DIR, 'evaluate')
  shutil.rmtree(run_dir, ignore_errors=True)
  writer = _tensorboard_writer(run_dir)
  for row in rows:
    for metric, value in row.items():
      if metric not in report.ROW_KEYS:
        writer.add_scalar(f'{row["model"]}/{row["scorer"]}/{metric}/{row["ood_set"]}', value, 0)
  for model, accuracy in id_accuracy.items():
    writer.add_scalar(f'{model}/id_accuracy', accuracy, 0)
  writer.close()


class Writer:
  """One stage's metrics from `first_step` on: its rows from that step on are dropped first
  (a resumed stage logs the steps after its checkpoint again)."""

  def __init__(self, workdir: str, stage: str, first_step: int):
    self._workdir, self._stage = workdir, stage
    self._tensorboard = None
    if jax.process_index() != 0:
      return
    rows = read(workdir)
    kept = [row for row in rows if row['stage'] != stage or row['step'] < first_step]
    if len(kept) != len(rows):
      logging.info('[%s] dropped %d metrics rows of step %d on, which it logs again', stage,
                   len(rows) - len(kept), first_step)
      _write_rows(workdir, kept)
    run_dir = os.path.join(workdir, TENSORBOARD_DIR, stage)
    shutil.rmtree(run_dir, ignore_errors=True)  # rebuilt from metrics.jsonl just below
    self._tensorboard = _tensorboard_writer(run_dir, flush_secs=30)
    for row in kept:
      if row['stage'] == stage:
        _add_scalars(self._tensorboard, row)

  def write(self, step: int, metrics: dict, kind: str = 'train', progress: str = '') -> None:
    """Logs `metrics` of `step`; `progress` (e.g. 'step 4/10 (40%), ETA ...') leads the line."""
    if self._tensorboard is None:
      return
    values = {k: float(v) for k, v in metrics.items()}
    logging.info('[%s] %s%s: %s', self._stage, '' if kind == 'train' else f'{kind} ',
                 progress or f'step {step}', ', '.join(f'{k}={v:.4g}' for k, v in values.items()))
    row = {'stage': self._stage, 'kind': kind, 'step': step, **values}
    with open(os.path.join(self._workdir, METRICS_FILE), 'a') as f:
      f.write(json.dumps(row) + '\n')
    _add_scalars(self._tensorboard, row)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

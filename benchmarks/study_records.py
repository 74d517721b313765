"""What every study here shares: one record per finished run (its study.csv rows, commit,
seconds, CPU seconds and machine), written whole or not at all, so a study resumes from its
records on any machine; study.csv (one value per cell, seed and quantity) and the statistics
and Markdown its document is made of (benchmarks/digits_study.py, fashion_mnist_study.py)."""

import csv
import json
import os
import platform
import resource
import subprocess
import time

import numpy as np
from scipy import stats

from mood_jax.run import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
CSV_FIELDS = ('cell', 'seed', 'model', 'scorer', 'set', 'metric', 'step', 'value')
# The validation sets' mean AUROC (vs id_val), a row of its own: what ranks and chooses.
VALIDATION = 'validation_mean'


# --- Runs and their records.

def commit() -> str:
  """HEAD's short hash, '-dirty' when the tree has uncommitted changes."""
  return subprocess.run(['git', 'describe', '--always', '--dirty', '--abbrev=7', '--exclude=*'],
                        cwd=REPO, capture_output=True, text=True).stdout.strip() or 'unknown'


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
  return usage.ru_utime + usage.ru_stime


def timed_run(config, directory: str) -> dict:
  """`pipeline.run(config, directory)` unless its results exist there; {'commit', 'seconds',
  'cpu_seconds', 'machine'} of the run that made them (a resumed run counts from its last
  start; runs made before CPU seconds were kept have none)."""
  run_json = os.path.join(directory, 'study_run.json')
  if not os.path.exists(os.path.join(directory, 'results', 'results.json')):
    start, cpu, code = time.perf_counter(), _cpu_seconds(), commit()  # the code that runs
    pipeline.run(config, directory)
    with open(run_json, 'w') as f:
      json.dump({'commit': code, 'seconds': time.perf_counter() - start,
                 'cpu_seconds': _cpu_seconds() - cpu, 'machine': MACHINE}, f)
  with open(run_json) as f:
    return json.load(f)


def records_dir(given: str | None, out: str, smoke: bool, committed: tuple[str, ...]) -> str:
  """Where a study's records go: --records if given, OUT/records for a smoke run, else the
  `committed` folder of this repository."""
  return os.path.abspath(given or (os.path.join(out, 'records') if smoke else
                                   os.path.join(REPO, *committed)))


def record_path(records: str, cell: str, seed: int) -> str:
  return os.path.join(records, cell, f'seed{seed}.json')


def finished(records: str, cell: str, seed: int) -> bool:
  return os.path.exists(record_path(records, cell, seed))


def read_record(records: str, cell: str, seed: int) -> dict:
  """{'commit', 'seconds', 'rows', ...}: a finished run, its rows as study.csv's."""
  with open(record_path(records, cell, seed)) as f:
    record = json.load(f)
  fields = record.pop('fields')
  record['rows'] = [dict(cell=cell, seed=seed, **dict(zip(fields, row)))
                    for row in record['rows']]
  return record


def write_record(records: str, cell: str, seed: int, rows: list[dict], run: dict) -> None:
  """The run's record, written whole or not at all: its existence means finished."""
  path = record_path(records, cell, seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fields = CSV_FIELDS[2:]  # cell and seed are in the path
  with open(path + '.partial', 'w') as f:
    json.dump({**run, 'fields': fields, 'rows': [[row[k] for k in fields] for row in rows]}, f,
              separators=(',', ':'))
  os.replace(path + '.partial', path)


def rows_of_results(results_dir: str, cell: str, seed: int, ood_set=lambda name: name) -> list:
  """A run's results.json as study.csv rows: AUROC/FPR@95 per (model, scorer, set or group
  mean), ID accuracy, and the validation sets' mean (vs id_val) as set VALIDATION.
  `ood_set` renames the sets (a one-class run's, by class)."""
  with open(os.path.join(results_dir, 'results.json')) as f:
    results = json.load(f)
  rows = []
  for row in results['rows']:
    for metric in ('auroc', 'fpr95'):
      rows.append(dict(cell=cell, seed=seed, model=row['model'], scorer=row['scorer'],
                       set=ood_set(row['ood_set']), metric=metric, step='', value=row[metric]))
  pairs = {(row['model'], row['scorer']) for row in results['rows']}
  for model, scorer in sorted(pairs):
    validation = [row['auroc'] for row in results['rows'] if row['model'] == model
                  and row['scorer'] == scorer and row['ood_group'] == 'validation']
    if validation:
      rows.append(dict(cell=cell, seed=seed, model=model, scorer=scorer,
                       set=ood_set(VALIDATION), metric='auroc', step='',
                       value=float(np.mean(validation))))
  for model, accuracy in results['id_accuracy'].items():
    rows.append(dict(cell=cell, seed=seed, model=model, scorer='', set=ood_set('id_test'),
                     metric='accuracy', step='', value=accuracy))
  return rows


# --- study.csv.

def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: str) -> list[dict]:
  with open(path, newline='') as f:
    return [{**row, 'seed': int(row['seed']), 'value': float(row['value'])}
            for row in csv.DictReader(f)]


def values(rows: list[dict], cell: str, **where) -> np.ndarray:
  """One quantity of `cell`, one value per seed, in seed order."""
  chosen = [row for row in rows if row['cell'] == cell
            and all(str(row[k]) == str(v) for k, v in where.items())]
  return np.asarray([row['value'] for row in sorted(chosen, key=lambda row: row['seed'])])


# --- Statistics.

def mean_std(x) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one seed)."""
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _t_interval(diff: float, se: float, df: float, test: str, seeds: tuple) -> dict:
  """The difference, its t, degrees of freedom and 95% interval, the test's name and the
  seeds on each side."""
  common = {'diff': diff, 'df': df, 'test': test, 'seeds': seeds}
  if se == 0:
    return {**common, 't': float('nan'), 'low': diff, 'high': diff}
  half = float(stats.t.ppf(0.975, df)) * se
  return {**common, 't': diff / se, 'low': diff - half, 'high': diff + half}


def welch(a, b) -> dict:
  """a - b for independent samples: Welch's t and the Welch-Satterthwaite degrees of
  freedom."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  df = float((va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
             ) if va + vb > 0 else float('nan')
  return _t_interval(float(a.mean() - b.mean()), float(np.sqrt(va + vb)), df, 'Welch',
                     (len(a), len(b)))


def paired(a, b) -> dict:
  """a - b seed by seed (a[i] and b[i] share a checkpoint or a run): the paired t."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'paired: {len(a)} and {len(b)} seeds; both sides need the same seeds')
  d = a - b
  return _t_interval(float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))),
                     float(len(d) - 1), 'paired', (len(a), len(b)))


# --- Markdown.

def pm(x, scale: float = 100., digits_: int = 1) -> str:
  """'mean ± std' of `x` times `scale`."""
  mean, std = mean_std(x)
  return f'{scale * mean:.{digits_}f} ± {scale * std:.{digits_}f}'


def table(header: list[str], lines: list[list[str]]) -> list[str]:
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
          *['| ' + ' | '.join(line) + ' |' for line in lines], '']

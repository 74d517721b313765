"""The Fashion-MNIST study: MOOD's one-class protocol against the published tables, and the
multi-class and split presets for every scorer, finetune and logit_ft.

  python -m mood_jax.data.prepare fashion_mnist     # once
  python -m benchmarks.fashion_mnist_study [--out=workdir/fmnist_study] [--doc=FILE.md]
  python -m benchmarks.fashion_mnist_study --smoke --data_dir=DIR --out=/tmp/fm_smoke

Every run is configs/fashion_mnist.py with a cell's preset, in its own workdir
OUT/<cell>/seed<n>, run by `pipeline.run` in this process. Cells (`grid`):
  oneclass_C  ':oneclass=C' for each class C: MIM pretraining on class C's train images (less
              id_val), then MOOD's Mahalanobis on that encoder and, as the control, on a
              randomly initialised encoder of the same shape (evaluate model 'random_init',
              same seed); ID = class C's test images, OOD = the other nine classes' (the
              'fashion_mnist_heldout' set). The protocol's mean is over the ten cells.
  default     ':' (ID = the ten classes, far OOD sets, letters for validation)
  split       ':split' (ID = classes 0-4, near OOD = test classes 5-8, class 9's train images
              for validation)
Seeds: 3 per cell (--seeds); every claim is a difference over them with its 95% interval,
paired, since both sides of each come from one run per seed.

Each finished run leaves a record (its study.csv rows, commit, seconds, CPU seconds, load and
machine) in --records, default benchmarks/results/fashion_mnist_study/, committed: a run with
a record is kept, so the study resumes on any machine and across sessions; an interrupted
run resumes from its checkpoints in OUT. Writes study.csv and study.json beside the records
and the document --doc (default docs/results_fashion_mnist.md; OUT/results_fashion_mnist.md
with --smoke) from those two alone (`render`). The published columns are constants here,
each with its source.
"""

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags

from benchmarks.study_records import (REPO, VALIDATION, finished, paired, pm, read_csv,
                                      read_record, records_dir, rows_of_results, table,
                                      timed_run, values, write_csv, write_record)
from configs import fashion_mnist

# The digits study has flags of the same names; the tests import both modules into one
# process, so these may take the names over (only the module that runs parses its flags).
_OUT = flags.DEFINE_string('out', 'workdir/fmnist_study', 'Directory of the runs.',
                           allow_override=True)
_DOC = flags.DEFINE_string('doc', None, 'The document to write (default: '
                           'docs/results_fashion_mnist.md; with --smoke, OUT/...).',
                           allow_override=True)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny steps, two classes, one seed: checks the '
                           'machinery.', allow_override=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None, "Where fashion_mnist is prepared (default: "
                                "the config's, ~/tensorflow_datasets).")
_RECORDS = flags.DEFINE_string(
    'records', None, 'Where the runs\' records, study.csv and study.json go (default: '
    'benchmarks/results/fashion_mnist_study; with --smoke, OUT/records).', allow_override=True)
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per cell (0, 1, ...).')

RECORDS = ('benchmarks', 'results', 'fashion_mnist_study')
HELDOUT = f'{fashion_mnist.NAME}_heldout'  # a one-class run's OOD set: the other nine classes
ONE_CLASS_SCORER = 'mahalanobis_mood'
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
           'Sneaker', 'Bag', 'Ankle boot')  # TFDS fashion_mnist's label names
SMOKE_CLASSES = (0, 1)
# Published one-class AUROCs (%) on Fashion-MNIST, class 0 to 9, methods trained from scratch
# on the same protocol (each class's train images as ID; the whole test set, the other nine
# classes as OOD). The numbers are those issue 37 copied from the papers.
PUBLISHED = {
    'GEOM': ((99.4, 97.6, 91.1, 89.9, 92.1, 93.4, 83.3, 98.9, 90.8, 99.2), 93.5,
             'Golan & El-Yaniv, "Deep Anomaly Detection Using Geometric Transformations", '
             'NeurIPS 2018'),
    'GOAD': ((94.1, 98.5, 90.8, 91.6, 91.4, 94.8, 83.4, 97.9, 98.9, 99.2), 94.1,
             'Bergman & Hoshen, "Classification-Based Anomaly Detection for General Data", '
             'ICLR 2020, Table 2'),
    'OC-SVM': (None, 92.8, 'as copied in the GEOM and GOAD tables'),
}
# Summarised by their mean (VALIDATION): they choose, the tables report the test sets.
VALIDATION_SETS = (VALIDATION, *fashion_mnist.VALIDATION_OOD, f'{fashion_mnist.NAME}_heldout_val')
MULTI_CLASS_SCORERS = ('mahalanobis_mood', 'msp', 'energy', 'maxlogit')
MODELS = ('finetune', 'logit_ft')


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str
  preset: str  # configs/fashion_mnist.py's argument

  def config(self, smoke: bool, data_dir: str | None):
    config = fashion_mnist.get_config(','.join(filter(None, (self.preset,
                                                             'smoke' if smoke else ''))))
    if data_dir:
      config.data.data_dir = data_dir
    if self.name.startswith('oneclass'):
      config.evaluate.models = 'pretrain,random_init'
    config.evaluate.detector.write = False  # the study reads results.json only
    return config


def grid(smoke: bool) -> list[Cell]:
  """In the order they run: the protocol's classes first, the multi-class presets after."""
  classes = SMOKE_CLASSES if smoke else range(len(CLASSES))
  return [*(Cell(f'oneclass_{c}', f'oneclass={c}') for c in classes),
          Cell('default', ''), Cell('split', 'split')]


def workdir(out: str, cell: str, seed: int) -> str:
  return os.path.join(out, cell, f'seed{seed}')


def run_cell(cell: Cell, seed: int, out: str, records: str, smoke: bool,
             data_dir: str | None) -> None:
  """One run and its record in `records`; kept when the record exists."""
  if finished(records, cell.name, seed):
    print(f'{cell.name} seed {seed}: done before, kept')
    return
  config = cell.config(smoke, data_dir)
  config.seed = seed
  directory = workdir(out, cell.name, seed)
  run = timed_run(config, directory)
  rows = rows_of_results(os.path.join(directory, 'results'), cell.name, seed)
  write_record(records, cell.name, seed, rows, {**run, 'load_average': os.getloadavg()[0]})
  print(f'{cell.name} seed {seed}: {run["seconds"]:.0f} s', flush=True)


# --- The document, from study.csv and study.json alone.

def one_class_values(rows, model: str, label: int) -> np.ndarray:
  """Class `label` as ID: AUROC of ONE_CLASS_SCORER against the other nine classes, per seed."""
  return values(rows, f'oneclass_{label}', model=model, scorer=ONE_CLASS_SCORER, set=HELDOUT,
                metric='auroc')


def one_class_means(rows, model: str, labels) -> np.ndarray:
  """Per seed, the mean over `labels` of their one-class AUROC (seeds every class has)."""
  per_class = [one_class_values(rows, model, label) for label in labels]
  seeds = min(map(len, per_class))
  return np.mean([x[:seeds] for x in per_class], axis=0)


def _difference(a, b) -> str:
  if len(a) < 2:
    return f'{100 * (a.mean() - b.mean()):+.1f} (one seed: no interval)'
  test = paired(a, b)
  return (f'{100 * test["diff"]:+.1f} [{100 * test["low"]:+.1f}, {100 * test["high"]:+.1f}] '
          f'(paired t over {len(a)} seeds)')


def _one_class_section(rows, labels: list[int]) -> list[str]:
  header = ['class', 'ours: MIM encoder', 'control: random-init encoder', 'MIM − random',
            *PUBLISHED]
  lines = []
  for label in labels:
    ours, control = one_class_values(rows, 'pretrain', label), one_class_values(
        rows, 'random_init', label)
    lines.append([f'{label} {CLASSES[label]}', pm(ours), pm(control),
                  _difference(ours, control),
                  *(f'{p[0][label]:.1f}' if p[0] else '' for p in PUBLISHED.values())])
  ours, control = one_class_means(rows, 'pretrain', labels), one_class_means(
      rows, 'random_init', labels)
  complete = len(labels) == len(CLASSES)
  lines.append([f'**mean of {len(labels)}**', pm(ours), pm(control), _difference(ours, control),
                *(f'{p[1]:.1f}' if complete else '' for p in PUBLISHED.values())])
  text = ['## One-class protocol', '',
          f'Each class in turn is ID: MIM pretraining on its train images, then MOOD\'s '
          f'Mahalanobis ({ONE_CLASS_SCORER}) on the mean-pooled encoder features, fitted on '
          'those train images; ID = its 1,000 test images, OOD = the 9,000 test images of the '
          'other nine classes. AUROC in %, mean ± std over seeds. The control scores a '
          'randomly initialised encoder of the same shape the same way, in the same run.', '',
          *table(header, lines)]
  for method, (_, mean, source) in PUBLISHED.items():
    text.append(f'- {method}: {source}.')
  text.append('')
  if complete:
    mean = 100 * ours.mean()
    standing = '; '.join(
        f'{method} {published:.1f} ({mean - published:+.1f} points: '
        f'{"ours above" if mean > published else "ours below"})'
        for method, (_, published, _) in PUBLISHED.items())
    text += [f'**Where we stand:** our mean over the ten classes is {mean:.1f} against '
             f'{standing}. The published numbers are single numbers from other code, '
             'training and preprocessing; our spread over seeds is in the table.', '']
  else:
    text += [f'Classes with a run so far: {len(labels)} of 10, so no mean is set beside the '
             'published ones.', '']
  return text


def _multi_class_table(rows, cell: str) -> list[str]:
  """Per (model, scorer): ID accuracy, validation AUROC and each OOD set's and group's."""
  sets = sorted({row['set'] for row in rows if row['cell'] == cell and row['metric'] == 'auroc'
                 and row['set'] not in VALIDATION_SETS},
                key=lambda s: (s.endswith('_mean'), s))  # the test sets, then group means
  header = ['model', 'scorer', 'ID test acc', 'validation AUROC', *(f'{s} AUROC' for s in sets)]
  lines = []
  for model in MODELS:
    for scorer in MULTI_CLASS_SCORERS:
      auroc = lambda s: values(rows, cell, model=model, scorer=scorer, set=s, metric='auroc')
      if not len(auroc(VALIDATION)):
        continue
      lines.append([model, scorer,
                    pm(values(rows, cell, model=model, set='id_test', metric='accuracy')),
                    pm(auroc(VALIDATION)), *(pm(auroc(s)) for s in sets)])
  return table(header, lines)


def _logit_ft_lines(rows, cell: str, group: str) -> list[str]:
  """logit_ft − finetune on `group`'s mean AUROC, per scorer (seed i of both: one run)."""
  lines = []
  for scorer in MULTI_CLASS_SCORERS:
    a = values(rows, cell, model='logit_ft', scorer=scorer, set=group, metric='auroc')
    b = values(rows, cell, model='finetune', scorer=scorer, set=group, metric='auroc')
    if len(a) and len(a) == len(b):
      lines.append(f'- {scorer}: logit_ft − finetune, {group} AUROC, {_difference(a, b)}.')
  return [*lines, '']


def render(rows: list[dict], meta: dict) -> str:
  """The document: every number from `rows` (study.csv) or `meta` (study.json), and the
  published columns (PUBLISHED)."""
  cells = {row['cell'] for row in rows}
  labels = sorted(int(name.split('_')[1]) for name in cells if name.startswith('oneclass_'))
  text = [
      '# Fashion-MNIST: MOOD\'s one-class protocol against published tables, and every '
      'scorer on the multi-class and split presets', '',
      'Generated by `benchmarks/fashion_mnist_study.py` from study.csv and study.json; do '
      'not edit.', '',
      f'- **Command:** `{meta["command"]}` (a finished run is kept, so it resumes).',
      f'- **Commits:** {", ".join(meta["commits"])}.',
      f'- **Cost:** {meta["runs"]} of the {meta["planned"]} planned runs; '
      f'{meta["run_seconds"] / 3600:.2f} h of run time and {meta["cpu_seconds"] / 3600:.2f} '
      'CPU-hours summed (a resumed run counts from its last start); load average at the end '
      f'of each run {meta["load"][0]:.1f} to {meta["load"][1]:.1f} (the machine was shared).',
      f'- **Machines:** {"; ".join(meta["machines"])}.',
      '- **Setup:** `configs/fashion_mnist.py` (its docstring says how each value was chosen, '
      'on validation only). Every choice (scorer hparams) reads letters, and with split the '
      "train images of class 9, against id_val (10% of each ID class's train images, never "
      'trained on); the test sets are only reported.', '']
  if labels:
    text += _one_class_section(rows, labels)
  for cell, title, group in (('default', 'Multi-class (ID = all ten classes)', 'far_mean'),
                             ('split', 'Split (ID = classes 0-4, near OOD = 5-8)',
                              'near_mean')):
    if cell not in cells:
      text += [f'## {title}', '', 'No run has finished yet.', '']
      continue
    preset = '' if cell == 'default' else f':{cell}'
    seeds = len(values(rows, cell, model='finetune', set='id_test', metric='accuracy'))
    text += [f'## {title}', '', f'`configs/fashion_mnist.py{preset}`, seeds: {seeds}. AUROC '
             'and accuracy in %, mean ± std over seeds; validation AUROC is the mean over the '
             'validation sets (vs id_val).', '',
             *_multi_class_table(rows, cell), *_logit_ft_lines(rows, cell, group)]
  return '\n'.join(text)


def write_outputs(records: str, doc: str, planned: list, command: str,
                  wall_seconds: float) -> None:
  """study.csv, study.json and the document from the records of `planned` that exist: after
  every run, so that what has finished is always written up."""
  runs = [read_record(records, cell.name, seed) for cell, seed in planned
          if finished(records, cell.name, seed)]
  if not runs:
    return
  rows = [row for run in runs for row in run['rows']]
  loads = [run.get('load_average', float('nan')) for run in runs]
  meta = {
      'command': command,
      'commits': sorted({run['commit'] for run in runs}),
      'machines': sorted({run['machine'] for run in runs}),
      'runs': len(runs), 'planned': len(planned),
      'run_seconds': sum(run['seconds'] for run in runs),
      'cpu_seconds': sum(run.get('cpu_seconds', 0.0) for run in runs),
      'load': [float(np.nanmin(loads)), float(np.nanmax(loads))],
      'wall_seconds': wall_seconds}
  write_csv(os.path.join(records, 'study.csv'), rows)
  with open(os.path.join(records, 'study.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  with open(doc, 'w') as f:
    f.write(render(read_csv(os.path.join(records, 'study.csv')), meta))


def main(argv) -> None:
  del argv
  smoke = _SMOKE.value
  out = os.path.abspath(_OUT.value)
  records = records_dir(_RECORDS.value, out, smoke, RECORDS)
  doc = _DOC.value or (os.path.join(out, 'results_fashion_mnist.md') if smoke else
                       os.path.join(REPO, 'docs', 'results_fashion_mnist.md'))
  command = ' '.join(['python -m benchmarks.fashion_mnist_study',
                      *(['--smoke', f'--out={_OUT.value}'] if smoke else []),
                      *([f'--seeds={_SEEDS.value}'] if _SEEDS.value != 3 else [])])
  start = time.perf_counter()
  cells, seeds = grid(smoke), range(1 if smoke else _SEEDS.value)
  # Seed by seed: a first complete pass over the cells before any second seed.
  planned = [(cell, seed) for seed in seeds for cell in cells]
  os.makedirs(os.path.dirname(doc), exist_ok=True)
  for cell, seed in planned:
    run_cell(cell, seed, out, records, smoke, _DATA_DIR.value)
    write_outputs(records, doc, planned, command, time.perf_counter() - start)
  with open(doc) as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main)

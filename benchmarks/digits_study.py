"""The digits study: does masked image modeling help OOD detection at equal compute, and does
Unleashing Mask's loss help where its premise holds?

  python -m benchmarks.digits_study [--out=workdir/study] [--doc=docs/results_digits.md]
  python -m benchmarks.digits_study --smoke --out=/tmp/study_smoke   # tiny steps, a few cells
  python -m benchmarks.digits_study --workers=2   # 2 processes, each pinned to half the CPUs

Every run is configs/digits.py:split,idval,nearval=9 with a cell's overrides, in its own
workdir OUT/<cell>/seed<n>, run by `pipeline.run` in this process or a --workers one. ID =
digits 0-4; 20% of each digit's ID train images are 'id_val', never trained on; the
validation OOD sets are letters and the train images of digit 9, scored against id_val; the
near-OOD test set is the test digits 5-8, the far ones textures, photos, faces, noise and
blobs. Scorer hparams
(evaluate.sweep), the ranking of cells and the recipe chosen read validation sets only.

Cells (`grid`):
  mim  scratch (finetune only) and MAE/BEiT pretraining + the same finetune, with scratch
       controls matched to each pretraining cell in optimizer steps (pretrain + finetune)
       and, separately, in training FLOPs (XLA's count of one lowered step of each stage,
       `dry_run.step_flops`, times its steps).
  um   UM's regime: one long fine-tune without label smoothing, drop-path or augmentation,
       for training CE to near zero ('um_base', a checkpoint every 25 steps kept; the
       document says whether it got there, PREMISE_CE), then from
       its last checkpoint, for the same steps: plain CE, UM's flooding (gamma from the
       masked model), UMAP (learned masks, weights frozen), sample_mask; and UM's protocol,
       flooding vs plain CE from an earlier checkpoint (logit_ft.init_step).
Along um_base the study records, per checkpoint, the clean ID-train CE and accuracy and the
fraction of atypical samples memorised (`memorisation`), and per evaluation (every 100
steps) id_val accuracy and the validation AUROC (`validation_curve`).

The full grid is 23 cells, about 60,000 optimizer steps over 3 seeds (more where seeds are
added).

Seeds: 3 per cell; 5 for both sides of every comparison whose difference is under two seed
standard deviations. Each finished run leaves a record (its study.csv rows, commit, seconds
and machine) in --records, default benchmarks/results/digits_study/, committed: a run with
a record is kept, so the study resumes on any machine and across sessions; an interrupted
run resumes from its checkpoints in OUT. Writes study.csv (every number, one per cell, seed
and quantity) and study.json (command, commits, machines, wall times, cells, comparisons,
costs) beside the records, and the document --doc (default docs/results_digits.md;
OUT/results_digits.md with --smoke) with its plots in results_digits/ beside it. The
document is generated from study.csv and study.json alone (`render`): no number in it is
typed by hand.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from benchmarks.study_records import (REPO, VALIDATION, finished, mean_std, paired, pm,
                                      read_csv, read_record, records_dir, rows_of_results,
                                      table, timed_run, values, welch, write_csv,
                                      write_record)
from configs import digits
from mood_jax import parallel, stages as all_stages
from mood_jax.ood import extraction
from mood_jax.run import dry_run, pipeline
from mood_jax.train import checkpoint, metrics_log
from mood_jax.stages import finetune

_OUT = flags.DEFINE_string('out', 'workdir/study', 'Directory of the runs and the tables.')
_DOC = flags.DEFINE_string('doc', None, 'The document to write (default: '
                           'docs/results_digits.md; with --smoke, OUT/results_digits.md).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny steps and a few cells: checks the machinery.')
_WORKERS = flags.DEFINE_integer(
    'workers', 1, 'Runs at once, each worker a process of its own pinned to its share of the '
    'CPUs: small steps use one core better than several.')
_RECORDS = flags.DEFINE_string(
    'records', None, 'Where the runs\' records, study.csv and study.json go (default: '
    'benchmarks/results/digits_study; with --smoke, OUT/records).')
_RUNS = flags.DEFINE_list('runs', None, 'A worker\'s share, CELL:SEED,...: runs them in order '
                          'and exits (--workers starts these).')

PRESET = 'split,idval,nearval=9'
SCORERS = ('mahalanobis_mood', 'msp', 'energy', 'knn', 'vim')  # the tables: the first three
# Claims are made on these (model is each cell's `model`): test sets' group means, AUROC.
TEST_SETS = ('near_mean', 'far_mean')
# Ranking and every choice: the validation sets' mean AUROC (vs id_val) of MOOD's Mahalanobis.
RANK_SCORER = 'mahalanobis_mood'
BASE_SEEDS, EXTRA_SEEDS = (0, 1, 2), (3, 4)
# A FLOP-matched scratch control this close (relative) to the step-matched one is that one.
SAME_CONTROL = 0.01
# UM's premise: a fine-tune long enough that clean training CE is near zero, below this.
PREMISE_CE = 0.05
# Atypical samples: those still misclassified at the first checkpoint that classifies this
# fraction of ID train right (the last checkpoint, if none does).
TYPICAL_ACCURACY = 0.9
# Each finished run's record (its study.csv rows, commit, seconds, machine), and study.csv
# and study.json: small, committed, so the study resumes anywhere; OUT can be redone.
RECORDS = ('benchmarks', 'results', 'digits_study')
UM_BASE = 'um_base'  # the long fine-tune: its record also holds the curves along it
TRAINING_STAGES = list(all_stages.TRAINING)


@dataclasses.dataclass(frozen=True)
class Sizes:
  finetune: int       # steps of every mim cell's fine-tune
  pretrain: tuple     # MIM pretraining lengths; the middle one is the default 'mae'
  long_finetune: int  # um_base's fine-tune
  checkpoint_every: int  # um_base's checkpoints, all kept: the memorisation curve
  eval_every: int     # um_base's evaluations on validation sets: the validation curve
  logit_ft: int       # steps of every um variant


FULL = Sizes(finetune=400, pretrain=(300, 600, 1200), long_finetune=2000, checkpoint_every=25,
             eval_every=100, logit_ft=400)
SMOKE = Sizes(finetune=4, pretrain=(2, 4, 8), long_finetune=8, checkpoint_every=2, eval_every=4,
              logit_ft=4)


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str
  group: str                 # 'mim' or 'um'
  overrides: tuple           # (config path, value) pairs on top of the preset
  model: str = 'finetune'    # the model its claims are about
  start_from: str = ''       # um variants: the cell whose finetune checkpoints they continue

  def config(self, smoke: bool):
    config = digits.get_config(PRESET + (',smoke' if smoke else ''))
    # The tables' three scorers only, at smoke size: each scorer's sweep costs compiles.
    config.evaluate.scorers = ','.join(SCORERS[:3] if smoke else SCORERS)
    config.evaluate.plots = False
    config.evaluate.detector.write = False
    for path, value in self.overrides:
      *parents, leaf = path.split('.')
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    return config


@dataclasses.dataclass(frozen=True)
class Comparison:
  cell: str
  control: str
  matched: str   # 'unmatched', 'steps', 'flops' or 'same' (one setting changed, same steps)
  question: str  # 'mim' or 'um'


def _mim_cells(sizes: Sizes) -> list[Cell]:
  """Scratch (unmatched) and the pretraining cells; each pretraining cell changes one thing
  from 'mae' (MAE random masking at 75%, the middle length, mean-pooled fc_norm feature)."""
  steps = dict(zip(('short', 'default', 'long'), sizes.pretrain))
  common = (('finetune.num_steps', sizes.finetune),)

  def pretrain(name, *more, length=steps['default']):
    return Cell(name, 'mim', (*common, ('stages', 'pretrain,finetune,evaluate'),
                              ('pretrain.num_steps', length), *more))

  return [scratch_cell(sizes.finetune),
          pretrain('mae'),
          pretrain(f'mae_steps{steps["short"]}', length=steps['short']),
          pretrain(f'mae_steps{steps["long"]}', length=steps['long']),
          pretrain('mae_mask50', ('pretrain.mask_ratio', 0.5)),
          pretrain('mae_mask90', ('pretrain.mask_ratio', 0.9)),
          pretrain('beit', ('pretrain.scheme', 'blockwise'), ('pretrain.mask_ratio', 0.4)),
          pretrain('mae_cls', ('model.pool', 'cls'))]


def scratch_cell(finetune_steps: int) -> Cell:
  """Fine-tuned from random init for `finetune_steps` (warm-up and cosine as any finetune)."""
  return Cell(f'scratch{finetune_steps}', 'mim', (
      ('stages', 'finetune,evaluate'), ('finetune.init_from', 'scratch'),
      ('finetune.num_steps', finetune_steps)))


def _um_cells(sizes: Sizes) -> list[Cell]:
  # UM's premise is memorisation: nothing that keeps training CE off zero.
  regime = (('finetune.num_steps', sizes.long_finetune), ('finetune.label_smoothing', 0.0),
            ('finetune.drop_path', 0.0), ('finetune.augment', False),
            ('finetune.ckpt_every', sizes.checkpoint_every),
            ('finetune.keep_checkpoints', sizes.long_finetune // sizes.checkpoint_every + 1),
            ('finetune.eval_every', sizes.eval_every), ('finetune.eval_scorer', RANK_SCORER),
            ('pretrain.num_steps', sizes.pretrain[1]))
  base = Cell(UM_BASE, 'um', (*regime, ('stages', 'pretrain,finetune,evaluate')))
  continuation = (*regime, ('stages', 'logit_ft,evaluate'),
                  ('logit_ft.num_steps', sizes.logit_ft), ('logit_ft.label_smoothing', 0.0),
                  ('logit_ft.drop_path', 0.0), ('logit_ft.augment', False))
  earlier = ('logit_ft.init_step', sizes.long_finetune // 2)

  def variant(name, *more):
    return Cell(name, 'um', (*continuation, *more), model='logit_ft', start_from=UM_BASE)

  return [base,
          variant('um_ce', ('logit_ft.loss', 'ce')),
          variant('um_flood', ('logit_ft.loss', 'um')),
          variant('um_umap', ('logit_ft.loss', 'um'), ('logit_ft.umap', 'scores')),
          variant('um_sample_mask', ('logit_ft.loss', 'sample_mask')),
          variant('um_early_ce', ('logit_ft.loss', 'ce'), earlier),
          variant('um_early_flood', ('logit_ft.loss', 'um'), earlier)]


SMOKE_CELLS = ('mae', UM_BASE, 'um_ce', 'um_flood')  # and mae's matched scratch controls


def step_flops(cell: Cell, smoke: bool) -> dict:
  """{stage: FLOPs of one step} of the training stages `cell` runs, from the lowered steps."""
  config = cell.config(smoke)
  placement = parallel.Placement.from_config(config)
  return {stage: dry_run.step_flops(stage, config, placement)
          for stage in config.stages.split(',') if stage in TRAINING_STAGES}


def training_cost(cell: Cell, smoke: bool, flops: dict) -> tuple[int, float]:
  """(optimizer steps, training FLOPs) of a cell, counting the stages it continues from;
  `flops` is {stage: FLOPs of one step}."""
  config = cell.config(smoke)
  stages = [s for s in TRAINING_STAGES if s in config.stages.split(',')]
  if cell.start_from:
    stages = ['pretrain', 'finetune', *stages]
  steps = {stage: config[stage].num_steps for stage in stages}
  if cell.start_from and config.logit_ft.init_step != -1:
    steps['finetune'] = config.logit_ft.init_step
  return sum(steps.values()), float(sum(n * flops[stage] for stage, n in steps.items()))


def grid(sizes: Sizes, smoke: bool) -> tuple[list[Cell], list[Comparison], dict]:
  """The cells, the comparisons, and {cell: (optimizer steps, training FLOPs)}. Scratch
  controls are named by their steps, so a step- and a FLOP-matched control that come out
  equal (within SAME_CONTROL) are one cell. --smoke keeps 'mae', its controls and a few um cells."""
  mim, um = _mim_cells(sizes), _um_cells(sizes)
  scratch = mim[0].name
  if smoke:
    mim = [cell for cell in mim if cell.name in (scratch, *SMOKE_CELLS)]
    um = [cell for cell in um if cell.name in SMOKE_CELLS]
  flops = {cell.name: step_flops(cell, smoke) for cell in mim + um}
  costs = {cell.name: training_cost(cell, smoke, {**flops.get(cell.start_from, {}),
                                                  **flops[cell.name]})
           for cell in mim + um}
  finetune_flops = flops[scratch]['finetune']  # as every mean-pooled finetune step's
  comparisons, controls = [], {}
  for cell in mim[1:]:
    comparisons.append(Comparison(cell.name, scratch, 'unmatched', 'mim'))
    if cell.name == 'mae_cls':  # its head differs: compared with mae at equal compute
      comparisons.append(Comparison(cell.name, 'mae', 'same', 'mim'))
      continue
    steps, total_flops = costs[cell.name]
    flops_steps = round(total_flops / finetune_flops)
    if abs(flops_steps - steps) <= SAME_CONTROL * steps:  # BEiT's step costs a finetune's
      flops_steps = steps
    for matched, n in (('steps', steps), ('flops', flops_steps)):
      control = scratch_cell(n)
      controls[control.name] = control
      costs[control.name] = (n, n * finetune_flops)
      comparisons.append(Comparison(cell.name, control.name, matched, 'mim'))
    if cell.name != 'mae':
      comparisons.append(Comparison(cell.name, 'mae', 'same', 'mim'))
  names = {cell.name for cell in mim + um}
  comparisons += [c for c in (
      Comparison('um_ce', UM_BASE, 'unmatched', 'um'),  # does continuing change anything
      *[Comparison(name, 'um_ce', 'steps', 'um')
        for name in ('um_flood', 'um_umap', 'um_sample_mask')],
      Comparison('um_early_flood', 'um_early_ce', 'steps', 'um'))
      if c.cell in names and c.control in names]
  cells = mim + [cell for name, cell in controls.items() if name != scratch] + um
  if smoke:  # the matched controls only: each run costs its compiles
    cells = [cell for cell in cells if cell.name != scratch]
    comparisons = [c for c in comparisons if c.control != scratch]
  return cells, comparisons, {cell.name: costs[cell.name] for cell in cells}


def cell_named(name: str, sizes: Sizes) -> Cell:
  """A cell of the grid by its name, without lowering any step (a worker's lookup)."""
  steps = re.fullmatch(r'scratch(\d+)', name)
  if steps:
    return scratch_cell(int(steps[1]))
  return {cell.name: cell for cell in _mim_cells(sizes) + _um_cells(sizes)}[name]


# --- Running.

def workdir(out: str, cell: str, seed: int) -> str:
  return os.path.join(out, cell, f'seed{seed}')


def _pipeline(cell: Cell, seed: int, out: str, smoke: bool) -> dict:
  """Runs (cell, seed) in its workdir unless its results exist there; {'commit', 'seconds'}
  of the run that made them."""
  config = cell.config(smoke)
  config.seed = seed
  config.data.data_dir = os.path.join(out, 'tfds')
  return timed_run(config, workdir(out, cell.name, seed))


def run_cell(cell: Cell, seed: int, out: str, records: str, smoke: bool) -> None:
  """One run and its record in `records`; kept when the record exists. A um variant starts
  from a copy of its base cell's finetune checkpoints (same seed), so every variant
  continues the same model; where those are gone (a new machine), the base run is redone."""
  if finished(records, cell.name, seed):
    print(f'{cell.name} seed {seed}: done before, kept')
    return
  if cell.start_from:
    base = cell_named(cell.start_from, SMOKE if smoke else FULL)
    copied = checkpoint.checkpoint_dir(workdir(out, cell.name, seed), 'finetune')
    source = checkpoint.checkpoint_dir(workdir(out, base.name, seed), 'finetune')
    if not os.path.isdir(copied):
      if not os.path.isdir(source):
        _pipeline(base, seed, out, smoke)
      shutil.rmtree(copied + '.partial', ignore_errors=True)
      shutil.copytree(source, copied + '.partial')
      os.replace(copied + '.partial', copied)
  run = _pipeline(cell, seed, out, smoke)
  rows = results_rows(cell, seed, out)
  if cell.name == UM_BASE:
    rows += curve_rows(cell, seed, out, smoke)
  write_record(records, cell.name, seed, rows, run)
  print(f'{cell.name} seed {seed}: {run["seconds"]:.0f} s')


def shares(runs: list, cells: dict, workers: int, smoke: bool) -> list[list]:
  """`runs` ((cell, seed) pairs, in order) split into `workers` lists of similar optimizer
  steps, longest job first. A um variant goes with its base cell's other runs of the same
  seed, after the base run where that is in `runs`: they start from its checkpoints."""
  jobs = {}
  for name, seed in runs:
    jobs.setdefault((cells[name].start_from or name, seed), []).append((name, seed))

  def steps(job):  # each run's own stages, and a compile and evaluation's worth per run
    return sum(sum(cells[name].config(smoke)[stage].num_steps for stage in TRAINING_STAGES
                   if stage in cells[name].config(smoke).stages.split(',')) + 150
               for name, _ in job)

  split, load = [[] for _ in range(workers)], [0] * workers
  for job in sorted(jobs.values(), key=steps, reverse=True):
    least = load.index(min(load))
    split[least] += job
    load[least] += steps(job)
  return split


def run_all(runs: list, cells: dict, out: str, records: str, smoke: bool,
            workers: int) -> None:
  """Every (cell, seed) of `runs`: here, or split among `workers` processes, each pinned to
  its share of this process's CPUs (XLA sizes its thread pool from them)."""
  if workers == 1:
    for name, seed in runs:
      run_cell(cells[name], seed, out, records, smoke)
    return
  cpus = sorted(os.sched_getaffinity(0))
  processes = []
  unfinished = [(name, seed) for name, seed in runs if not finished(records, name, seed)]
  for worker, share in enumerate(shares(unfinished, cells, workers, smoke)):
    if not share:
      continue
    pinned = set(cpus[worker::workers]) or set(cpus)
    command = [sys.executable, '-m', 'benchmarks.digits_study', f'--out={out}',
               f'--records={records}', *(['--smoke'] if smoke else []),
               '--runs=' + ','.join(f'{name}:{seed}' for name, seed in share)]
    processes.append(subprocess.Popen(
        command, cwd=REPO, preexec_fn=lambda pinned=pinned: os.sched_setaffinity(0, pinned)))
  failed = [number for number, process in enumerate(processes) if process.wait() != 0]
  if failed:
    raise SystemExit(f'digits_study: worker(s) {failed} failed (their output is above); run '
                     'the same command again: finished runs are kept, unfinished ones resume')


def memorisation(cell: Cell, seed: int, out: str, smoke: bool) -> list[dict]:
  """Per finetune checkpoint on its schedule (not a preemption's): clean ID-train CE and
  accuracy, and from the reference checkpoint on, the fraction of the atypical samples
  classified right. Atypical: the ID-train samples still misclassified at the first
  checkpoint that gets TYPICAL_ACCURACY of them right, the ones a network fits last (Arpit et
  al. 2017, "A closer look at memorization in deep networks"), whose memorisation UM blames
  for the late drop in OOD detection and which its loss makes the model forget
  (Unleashing-Mask README.md: "forget those relatively atypical ID samples")."""
  directory = workdir(out, cell.name, seed)
  config = cell.config(smoke)
  config.seed, config.data.data_dir = seed, os.path.join(out, 'tfds')
  placement = parallel.Placement.from_config(config)
  model, init_params = finetune.classifier(config, drop_path=0.0)
  forward = extraction.make_forward(model, placement.mesh)
  with checkpoint.manager(checkpoint.checkpoint_dir(directory, 'finetune')) as mngr:
    steps = sorted(step for step in mngr.all_steps() if step % config.finetune.ckpt_every == 0
                   or step == config.finetune.num_steps)
  ce, right = {}, {}
  for step in steps:
    params = checkpoint.restore_params(directory, 'finetune', init_params, placement, step)
    train = extraction.extract(forward, params, config.data, 'id_train', placement.mesh,
                              batch_size=config.evaluate.batch_size)
    logits, labels = train['logits'].astype(np.float64), train['label']
    shifted = logits - logits.max(axis=1, keepdims=True)
    ce[step] = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels]
    right[step] = logits.argmax(axis=1) == labels
  reference = next((step for step in steps if right[step].mean() >= TYPICAL_ACCURACY), steps[-1])
  atypical = ~right[reference]
  return [{'step': step, 'train_ce': float(ce[step].mean()),
           'train_accuracy': float(right[step].mean()), 'atypical': int(atypical.sum()),
           'memorised': float(right[step][atypical].mean())
                        if step >= reference and atypical.any() else float('nan')}
          for step in steps]


def validation_curve(cell: Cell, seed: int, out: str) -> list[dict]:
  """Per evaluation during um_base's fine-tune (train_eval): ID validation accuracy and the
  validation sets' mean AUROC (RANK_SCORER, vs id_val), from the run's metrics.jsonl: UM's
  finding is that OOD detection peaks before the end."""
  rows = []
  for row in metrics_log.read(workdir(out, cell.name, seed)):
    if row['stage'] == 'finetune' and row.get('kind') == 'eval':
      aurocs = [value for key, value in row.items()
                if key.startswith(f'{RANK_SCORER}_auroc_') and key.endswith('_vs_id_val')]
      rows.append({'step': row['step'], 'id_val_accuracy': row['id_val_accuracy'],
                   'validation_auroc': float(np.mean(aurocs))})
  return rows


def curve_rows(cell: Cell, seed: int, out: str, smoke: bool) -> list[dict]:
  """The long fine-tune's curves as study.csv rows, one per (finetune step, quantity)."""
  rows = []
  for row in memorisation(cell, seed, out, smoke):
    rows += [dict(cell=cell.name, seed=seed, model='finetune', scorer='', set='id_train',
                  metric=metric, step=row['step'], value=row[metric])
             for metric in ('train_ce', 'train_accuracy', 'memorised', 'atypical')]
  for row in validation_curve(cell, seed, out):
    rows += [dict(cell=cell.name, seed=seed, model='finetune', scorer=RANK_SCORER,
                  set=VALIDATION, metric=metric, step=row['step'], value=row[metric])
             for metric in ('id_val_accuracy', 'validation_auroc')]
  return rows


# --- The study's numbers: study.csv, one value per (cell, seed, quantity).

def results_rows(cell: Cell, seed: int, out: str) -> list[dict]:
  """One run's AUROC/FPR@95 per (model, scorer, set or group mean), ID accuracy, and the
  validation sets' mean (vs id_val) as set VALIDATION."""
  return rows_of_results(os.path.join(workdir(out, cell.name, seed), 'results'), cell.name,
                         seed)


def claim_metric(question: str) -> tuple[str, str, str]:
  """(scorer, set, metric) a comparison's seeds and verdict rest on: MOOD's Mahalanobis for
  MIM (the study's original claim), energy for UM (UM's own scorer), near-OOD AUROC."""
  return ('mahalanobis_mood' if question == 'mim' else 'energy', 'near_mean', 'auroc')


def comparison_values(rows, cells: dict, comparison: Comparison, scorer, ood_set, metric):
  model = cells[comparison.cell].model
  control_model = cells[comparison.control].model
  return (values(rows, comparison.cell, model=model, scorer=scorer, set=ood_set, metric=metric),
          values(rows, comparison.control, model=control_model, scorer=scorer, set=ood_set,
                 metric=metric))


def shares_checkpoints(cells: dict, comparison: Comparison) -> bool:
  """Whether seed i of both sides continues the same checkpoint (a um variant and its base,
  or two variants of one base): then the seeds are paired."""
  start = cells[comparison.cell].start_from
  return bool(start) and start in (comparison.control, cells[comparison.control].start_from)


def compare(rows, cells: dict, comparison: Comparison) -> dict:
  """The comparison on its claim metric: a paired t where the seeds share checkpoints,
  Welch's t where they are independent runs."""
  a, b = comparison_values(rows, cells, comparison, *claim_metric(comparison.question))
  return (paired if shares_checkpoints(cells, comparison) else welch)(a, b)


def needs_more_seeds(rows, cells: dict, comparisons) -> set[str]:
  """The cells of every comparison whose difference is under two seed standard deviations
  (the larger of its two sides'), and the cells those continue from."""
  chosen = set()
  for comparison in comparisons:
    a, b = comparison_values(rows, cells, comparison, *claim_metric(comparison.question))
    if abs(a.mean() - b.mean()) < 2 * max(mean_std(a)[1], mean_std(b)[1]):
      chosen |= {comparison.cell, comparison.control}
  return chosen | {cells[name].start_from for name in chosen if cells[name].start_from}


# --- The document, from study.csv and study.json alone.

def _cost_line(meta: dict, cell: str) -> list[str]:
  steps, flops = meta['costs'][cell]
  return [str(steps), f'{flops / 1e12:.4g}']


def _results_table(rows, meta, names: list[str], model_of: dict) -> list[str]:
  header = ['cell', 'optimizer steps', 'training TFLOPs', 'seeds', 'ID test acc',
            f'{RANK_SCORER} validation AUROC (vs id_val)']
  for scorer in ('mahalanobis_mood', 'msp', 'energy'):
    header += [f'{scorer} near AUROC', f'{scorer} far AUROC']
  lines = []
  for name in names:
    model = model_of[name]
    line = [name, *_cost_line(meta, name),
            str(len(values(rows, name, model=model, set='id_test', metric='accuracy'))),
            pm(values(rows, name, model=model, set='id_test', metric='accuracy')),
            pm(values(rows, name, model=model, scorer=RANK_SCORER, set=VALIDATION,
                       metric='auroc'))]
    for scorer in ('mahalanobis_mood', 'msp', 'energy'):
      line += [pm(values(rows, name, model=model, scorer=scorer, set=s, metric='auroc'))
               for s in TEST_SETS]
    lines.append(line)
  return table(header, lines)


def _comparisons_table(rows, cells, comparisons) -> tuple[list[str], dict]:
  """Each comparison on its claim metric: the difference, its 95% interval and t."""
  header = ['cell', 'control', 'matched', 'scorer, set', 'difference (points)', '95% interval',
            't (df), test', 'seeds']
  lines, tests = [], {}
  for comparison in comparisons:
    scorer, ood_set, metric = claim_metric(comparison.question)
    test = tests[comparison] = compare(rows, cells, comparison)
    lines.append([comparison.cell, comparison.control, comparison.matched,
                  f'{scorer}, {ood_set} {metric.upper()}', f'{100 * test["diff"]:+.1f}',
                  f'[{100 * test["low"]:+.1f}, {100 * test["high"]:+.1f}]',
                  f'{test["t"]:.2f} ({test["df"]:.1f}), {test["test"]}',
                  ' / '.join(map(str, test['seeds']))])
  return table(header, lines), tests


def verdict(test: dict) -> str:
  if test['low'] > 0:
    return 'yes (the interval is above zero)'
  if test['high'] < 0:
    return 'no, worse (the interval is below zero)'
  return 'not distinguishable (the interval contains zero)'


def plain_answer(tests: dict, comparisons: list, what: str, premise: bool = True) -> str:
  """A question's answer in a word, from its comparisons' intervals, and the counts behind
  it. `premise` False: the experiment did not reach the regime the question is about."""
  k = len(comparisons)
  above = sum(tests[c]['low'] > 0 for c in comparisons)
  below = sum(tests[c]['high'] < 0 for c in comparisons)
  positive = sum(tests[c]['diff'] > 0 for c in comparisons)
  if above == k:
    word = 'yes'
  elif above and below:
    word = 'mixed'
  elif above:
    word = 'in part'
  elif below == k:
    word = 'no, worse'
  elif below:
    word = 'worse in part'
  else:
    word = 'not shown'
  caveat = '' if premise else ("UM's premise does not hold in this run, so this does not "
                               "test UM's claim. ")
  outside = '; '.join(f'{c.cell} vs {c.control} ({c.matched}) {100 * tests[c]["diff"]:+.2f} '
                      f'[{100 * tests[c]["low"]:+.2f}, {100 * tests[c]["high"]:+.2f}]'
                      for c in comparisons if tests[c]['low'] > 0 or tests[c]['high'] < 0)
  return (f'{caveat}**Answer: {word}.** Of the {k} {what}, {above} have a 95% interval above '
          f'zero, {below} below zero and {k - above - below} contain it'
          f'{f" ({outside})" if outside else ""}; {positive} of the {k} differences are '
          'positive (the comparisons share cells, so they are not independent evidence). At '
          f'95%, about {k / 20:.1f} of {k} intervals exclude zero by chance alone.')


def _answers(tests: dict, comparison_of: dict, questions) -> list[str]:
  """A line per (title, (cell, matched)) whose comparison is in the grid."""
  lines = []
  for title, key in questions:
    comparison = comparison_of.get(key)
    if comparison is None:
      continue
    test = tests[comparison]
    lines.append(f'- {title}: {comparison.cell} vs {comparison.control}, '
                 f'{100 * test["diff"]:+.1f} points [{100 * test["low"]:+.1f}, '
                 f'{100 * test["high"]:+.1f}]; {verdict(test)}.')
  return [*lines, '']


def _steps(rows, cell: str, metric: str) -> list[int]:
  return sorted({int(row['step']) for row in rows
                 if row['cell'] == cell and row['metric'] == metric})


def premise_holds(rows) -> bool | None:
  """UM's premise: um_base's clean ID-train CE at its last checkpoint, mean over seeds, below
  PREMISE_CE; None without um_base's curve."""
  steps = _steps(rows, UM_BASE, 'train_ce')
  if not steps:
    return None
  return bool(values(rows, UM_BASE, metric='train_ce', step=steps[-1]).mean() < PREMISE_CE)


def _premise(rows) -> list[str]:
  """Whether um_base got to UM's regime: its training CE and memorisation at the end, where
  the atypical samples were fixed, and where validation AUROC peaked."""
  steps = _steps(rows, UM_BASE, 'train_ce')
  if not steps:
    return []
  ce = values(rows, UM_BASE, metric='train_ce', step=steps[-1])
  memorised = values(rows, UM_BASE, metric='memorised', step=steps[-1])
  memorised = memorised[~np.isnan(memorised)]
  fixed = [row for row in rows if row['cell'] == UM_BASE and row['metric'] == 'memorised'
           and not np.isnan(row['value'])]  # from each seed's reference checkpoint on
  references = sorted({min(int(row['step']) for row in fixed if row['seed'] == seed)
                       for seed in {row['seed'] for row in fixed}})
  atypical = values(rows, UM_BASE, metric='atypical', step=steps[-1])
  evals = _steps(rows, UM_BASE, 'validation_auroc')
  curve = [values(rows, UM_BASE, metric='validation_auroc', step=step).mean() for step in evals]
  peak = int(np.argmax(curve)) if curve else None
  holds = 'holds' if premise_holds(rows) else 'does not hold'
  text = (f'At its last step ({steps[-1]}) um_base has a clean ID-train CE of {pm(ce, 1., 4)} '
          f'and has memorised {pm(memorised) if len(memorised) else "n/a"}% of its atypical '
          f'samples. UM\'s premise (clean training CE below {PREMISE_CE}) {holds}. '
          f'Atypical samples ({pm(atypical, 1., 0)} per seed): the ID-train samples (clean '
          'images) still misclassified at the first checkpoint that classifies '
          f'{100 * TYPICAL_ACCURACY:.0f}% of them right, or the last if none does (step '
          f'{", ".join(map(str, references)) or "n/a"}), the ones a network fits last (Arpit et '
          'al. 2017, "A closer look at memorization in deep networks"), which UM\'s loss is '
          'to make the model forget (Unleashing-Mask README.md); memorised: classified right '
          'at that step.')
  if peak is not None:
    text += (f' UM finds that OOD detection peaks before the end of training and degrades '
             f'after. Here validation AUROC ({RANK_SCORER} vs id_val, mean over seeds) ')
    if peak == len(evals) - 1:
      text += f'is highest at the last evaluation (step {evals[-1]}, {100 * curve[-1]:.1f}).'
    else:
      drop = paired(values(rows, UM_BASE, metric='validation_auroc', step=evals[peak]),
                    values(rows, UM_BASE, metric='validation_auroc', step=evals[-1]))
      text += (f'peaks at step {evals[peak]} ({100 * curve[peak]:.2f}) and ends at '
               f'{100 * curve[-1]:.2f} (step {evals[-1]}): peak − end, seed by seed, '
               f'{100 * drop["diff"]:+.2f} points [{100 * drop["low"]:+.2f}, '
               f'{100 * drop["high"]:+.2f}] (paired t).')
  return [text, '']


def _curve_table(rows, cell: str) -> list[str]:
  """um_base at each validation evaluation: training CE, accuracy and memorisation from the
  checkpoint of that step, id_val accuracy and validation AUROC."""
  lines = []
  for step in _steps(rows, cell, 'validation_auroc'):
    line = [str(step)]
    for metric, scale, digits_ in (('train_ce', 1., 4), ('train_accuracy', 100., 1),
                                   ('memorised', 100., 1), ('id_val_accuracy', 100., 1),
                                   ('validation_auroc', 100., 1)):
      x = values(rows, cell, metric=metric, step=step)
      x = x[~np.isnan(x)]
      line.append(pm(x, scale, digits_) if len(x) else 'n/a')
    lines.append(line)
  return table(['finetune step', 'ID-train CE (clean)', 'ID-train acc', 'atypical memorised',
                 'id_val acc', f'{RANK_SCORER} validation AUROC (vs id_val)'], lines)


def render(rows: list[dict], meta: dict) -> str:
  """The document: every number from `rows` (study.csv) or `meta` (study.json)."""
  cells = {cell['name']: Cell(cell['name'], cell['group'], (), cell['model'], cell['start_from'])
           for cell in meta['cells']}
  comparisons = [Comparison(**c) for c in meta['comparisons']]
  model_of = {name: cell.model for name, cell in cells.items()}
  mim = [name for name, cell in cells.items() if cell.group == 'mim']
  um = [name for name, cell in cells.items() if cell.group == 'um']
  ranked = sorted(mim, key=lambda name: -values(
      rows, name, model=model_of[name], scorer=RANK_SCORER, set=VALIDATION, metric='auroc').mean())
  mim_table, mim_tests = _comparisons_table(
      rows, cells, [c for c in comparisons if c.question == 'mim'])
  um_table, um_tests = _comparisons_table(
      rows, cells, [c for c in comparisons if c.question == 'um'])
  tests = {**mim_tests, **um_tests}
  comparison_of = {(c.cell, c.matched): c for c in comparisons}
  # One per (cell, control): where the FLOP-matched control is the step-matched one.
  mim_matched = list({(c.cell, c.control): c for c in comparisons
                      if c.question == 'mim' and c.matched in ('steps', 'flops')}.values())
  um_losses = [c for c in comparisons if c.question == 'um' and c.matched == 'steps']
  (mim_scorer, mim_set, mim_metric), (um_scorer, um_set, um_metric) = map(claim_metric,
                                                                          ('mim', 'um'))
  text = [
      '# Digits study: MIM at equal compute, and Unleashing Mask where its premise holds', '',
      'Generated by `benchmarks/digits_study.py` from study.csv and study.json; do not edit.',
      '',
      f'- **Command:** `{meta["command"]}` (a finished run is kept, so it resumes).',
      f'- **Commits:** {", ".join(meta["commits"])}.',
      f'- **Wall time:** {meta["runs"]} runs, {meta["run_seconds"] / 3600:.2f} h of run time '
      'summed (a resumed run counts from its last start); the invocation that wrote this '
      f'document {meta["wall_seconds"] / 3600:.2f} h (it kept the runs that had records).',
      f'- **Machines:** {"; ".join(meta["machines"])}.',
      f'- **Setup:** `configs/digits.py:{PRESET}`: ID = digits 0-4; id_val = 20% of each '
      "digit's ID train images, never trained on. Validation OOD = letters and the train "
      'images of digit 9, scored against id_val; they choose scorer hparams and rank the '
      'cells. Near-OOD test = test digits 5-8; far-OOD test = textures, photos, lfw_faces, '
      'uniform_noise, gaussian_blobs. Mean ± std over seeds (sample std), in %. '
      f'Seeds: {len(meta["seeds"])} per cell, {len(meta["seeds"]) + len(meta["extra_seeds"])} '
      'for both '
      'sides of every comparison whose difference on its claim metric is under two seed '
      'standard deviations. '
      'Training FLOPs: XLA\'s count of one lowered step of each stage '
      '(`mood_jax.run.dry_run.step_flops`) times its steps.',
      f'- **Claims:** each comparison rests on one metric: MIM\'s on {mim_scorer} '
      f'{mim_set} {mim_metric.upper()} (MOOD\'s scorer), UM\'s on {um_scorer} {um_set} '
      f'{um_metric.upper()} (UM\'s README runs its post-hoc example with `--energy` and '
      'reports Energy against Energy+UM; tmlr-group/Unleashing-Mask README.md). '
      f'{len(comparisons)} comparisons in all: at 95%, about '
      f'{len(comparisons) / 20:.1f} of them would exclude zero by chance alone.', '',
      '## Does MIM help at equal compute?', '',
      plain_answer(tests, mim_matched, 'compute-matched comparisons (each pretraining cell '
                   'against scratch at its optimizer steps and at its training FLOPs; one '
                   'comparison where the two controls coincide)'), '',
      *_answers(tests, comparison_of, (
          ('Equal optimizer steps', ('mae', 'steps')),
          ('Equal training FLOPs', ('mae', 'flops')),
          ("Unmatched (scratch only fine-tunes, as long as mae's fine-tune)",
           ('mae', 'unmatched')))),
      *_results_table(rows, meta, mim, model_of),
      f'Ranked on validation ({RANK_SCORER} AUROC vs id_val), best first: {", ".join(ranked)}. '
      f'The recipe chosen on validation: {ranked[0]}.', '',
      'Each comparison on its claim metric (difference = cell − control, in AUROC points; '
      '95% interval and t from Welch\'s test: the runs are independent):', '',
      *mim_table,
      '![AUROC vs pretraining steps](results_digits/auroc_vs_pretraining_steps.png)', '',
      '## Does UM\'s loss help when its premise holds?', '',
      *_premise(rows),
      plain_answer(tests, um_losses, 'comparisons of a loss with plain CE continued from the '
                   'same checkpoint for the same steps', premise_holds(rows) is not False), '',
      *_answers(tests, comparison_of, (
          ('UM flooding vs plain CE, same checkpoint and steps', ('um_flood', 'steps')),
          ('UMAP vs plain CE', ('um_umap', 'steps')),
          ('sample_mask vs plain CE', ('um_sample_mask', 'steps')),
          ("UM's protocol, flooding vs plain CE from an earlier checkpoint",
           ('um_early_flood', 'steps')))),
      *_curve_table(rows, UM_BASE),
      '![um_base training curve](results_digits/um_base_curve.png)', '',
      *_results_table(rows, meta, um, model_of),
      f'Each comparison on {um_scorer} {um_set} {um_metric.upper()} (difference = cell − '
      'control, in points; a paired t over seeds, since seed i of every um variant continues '
      'seed i of um_base):',
      '', *um_table]
  return '\n'.join(text)


def plot_length(path: str, rows, meta) -> None:
  """Validation, near- and far-OOD AUROC of MOOD's Mahalanobis against total training
  steps: the MAE length cells and the scratch cells."""
  figure = Figure(figsize=(6, 4), layout='constrained')
  axes = figure.subplots()
  for prefix, marker in (('scratch', 'o'), ('mae', 's')):
    pattern = r'scratch\d+' if prefix == 'scratch' else r'mae(_steps\d+)?'
    names = sorted((name for name in meta['costs'] if re.fullmatch(pattern, name)),
                   key=lambda name: meta['costs'][name][0])
    steps = [meta['costs'][name][0] for name in names]
    for ood_set, label in ((VALIDATION, 'validation'), ('near_mean', 'near'),
                           ('far_mean', 'far')):
      means = [mean_std(values(rows, name, model='finetune', scorer=RANK_SCORER, set=ood_set,
                               metric='auroc')) for name in names]
      axes.errorbar(steps, [100 * m for m, _ in means], yerr=[100 * s for _, s in means],
                    marker=marker, capsize=3, label=f'{prefix} {label}')
  axes.set(xlabel='optimizer steps (pretrain + finetune)', ylabel='AUROC (%)',
           title=f'{RANK_SCORER}, finetune model, mean ± std over seeds')
  axes.legend(fontsize='small')
  figure.savefig(path, dpi=100)


def plot_curve(path: str, rows) -> None:
  """um_base along its fine-tune, mean over seeds: clean ID-train CE (log scale); the
  memorised atypical fraction and the validation AUROC."""
  figure = Figure(figsize=(9, 4), layout='constrained')
  loss, fractions = figure.subplots(1, 2)
  for axes, curves in ((loss, (('train_ce', 'train_ce'),)),
                       (fractions, (('memorised', 'atypical memorised'),
                                    ('validation_auroc', f'{RANK_SCORER} validation AUROC')))):
    for metric, label in curves:
      points = []
      for step in _steps(rows, UM_BASE, metric):
        x = values(rows, UM_BASE, metric=metric, step=step)
        x = x[~np.isnan(x)]
        if len(x):
          points.append((step, x.mean() if metric == 'train_ce' else 100 * x.mean()))
      axes.plot(*zip(*points), marker='.', label=label)
    axes.set(xlabel='finetune step')
    axes.legend()
  loss.set(yscale='log', ylabel='clean ID-train CE', title='um_base, mean over seeds')
  fractions.set(ylabel='%')
  figure.savefig(path, dpi=100)


def main(argv) -> None:
  del argv
  smoke = _SMOKE.value
  out = os.path.abspath(_OUT.value)
  records = records_dir(_RECORDS.value, out, smoke, RECORDS)
  if _RUNS.value is not None:  # a worker: its share, then the parent renders
    for run in _RUNS.value:
      name, seed = run.rsplit(':', 1)
      run_cell(cell_named(name, SMOKE if smoke else FULL), int(seed), out, records, smoke)
    return
  if _WORKERS.value < 1:
    raise app.UsageError(f'--workers={_WORKERS.value}: give 1 or more')
  doc = _DOC.value or (os.path.join(out, 'results_digits.md') if smoke else
                       os.path.join(REPO, 'docs', 'results_digits.md'))
  start = time.perf_counter()
  cells, comparisons, costs = grid(SMOKE if smoke else FULL, smoke)
  by_name = {cell.name: cell for cell in cells}
  seeds_first = BASE_SEEDS[:2] if smoke else BASE_SEEDS
  seeds = {cell.name: seeds_first for cell in cells}
  extra = () if smoke else EXTRA_SEEDS  # the rule is tested apart: smoke runs stay few
  for round_ in range(2):
    run_all([(cell.name, seed) for cell in cells for seed in seeds[cell.name]], by_name, out,
            records, smoke, _WORKERS.value)
    runs = [read_record(records, cell.name, seed) for cell in cells for seed in seeds[cell.name]]
    rows = [row for run in runs for row in run['rows']]
    if round_ == 0:
      for name in needs_more_seeds(rows, by_name, comparisons):
        seeds[name] = (*seeds[name], *extra)
  meta = {
      'command': 'python -m benchmarks.digits_study' + (f' --smoke --out={_OUT.value}'
                                                        if smoke else '') + (
          f' --workers={_WORKERS.value}' if _WORKERS.value > 1 else ''),
      'commits': sorted({run['commit'] for run in runs}),
      'machines': sorted({run['machine'] for run in runs}),
      'runs': len(runs), 'run_seconds': sum(run['seconds'] for run in runs),
      'wall_seconds': time.perf_counter() - start,
      'cells': [{'name': c.name, 'group': c.group, 'model': c.model, 'start_from': c.start_from}
                for c in cells],
      'comparisons': [dataclasses.asdict(c) for c in comparisons],
      'costs': costs, 'seeds': seeds_first, 'extra_seeds': extra}
  write_csv(os.path.join(records, 'study.csv'), rows)
  with open(os.path.join(records, 'study.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  plots = os.path.join(os.path.dirname(doc), 'results_digits')
  os.makedirs(plots, exist_ok=True)
  plot_length(os.path.join(plots, 'auroc_vs_pretraining_steps.png'), rows, meta)
  plot_curve(os.path.join(plots, 'um_base_curve.png'), rows)
  text = render(read_csv(os.path.join(records, 'study.csv')), meta)
  with open(doc, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  app.run(main)

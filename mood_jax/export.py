"""Command line: writes a detector directory from a finished run (see mood_jax/detector.py).

    python -m mood_jax.export --workdir=WORKDIR --out=DIR [--model=auto] [--scorers=auto]
        [--tprs=0.95,0.99] [--data_dir=...]

The run's config comes from its newest training checkpoint, its scores and the scorers'
hparams from WORKDIR/results/results.json (run evaluate first). The chosen scorers are fitted
on the ID training set again and their thresholds set on the ID test split, as evaluate does;
an existing DIR is never overwritten.
"""

import functools
import json
import os
import sys

import ml_collections

from mood_jax import command_line, parallel, stages
from mood_jax.data import catalogue
from mood_jax.errors import UserError
from mood_jax.ood import detector_choice, detector_format, extraction, scorers
from mood_jax.stages import evaluate
from mood_jax.train import checkpoint

def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved with the newest finished stage's final checkpoint (the last stage's
  config holds every stage's settings as they were last run)."""
  for stage in reversed(stages.TRAINING):
    step = checkpoint.final_step(workdir, stage)
    if step is not None:
      with checkpoint.manager(checkpoint.checkpoint_dir(workdir, stage)) as mngr:
        return ml_collections.ConfigDict(checkpoint.saved_config(mngr, step))
  raise UserError(f'no finished training stage in {workdir}: pass the --workdir of a run '
                  'of python -m mood_jax.main')


def _results(workdir: str) -> dict:
  path = os.path.join(workdir, 'results', 'results.json')
  if not os.path.isfile(path):
    raise UserError(f'no {path}: run the evaluate stage first (--config.stages=evaluate)')
  with open(path) as f:
    return json.load(f)


def fit_chosen(config, workdir: str, placement: parallel.Placement, model_name: str,
               hparams: dict):
  """(params, {scorer: (configured Scorer, stats)}, {scorer: ID test scores}) of one model,
  fitted and scored as the evaluate stage does; `hparams` is {scorer: its hparams}."""
  model, params, has_head = evaluate.MODELS[model_name](config, workdir, placement)
  mesh = placement.mesh
  extract = functools.partial(extraction.extract, params=params, data_cfg=config.data, mesh=mesh,
                              batch_size=config.evaluate.batch_size, seed=config.seed)
  plain = extraction.make_forward(model, mesh)
  cfg = config.evaluate
  sets = evaluate.extract_sets(extract, plain, evaluate.id_train_banks(cfg, list(hparams)))
  on_id_val = cfg.fit_on_id_validation.strip() or any(
      scorers.get(name).fits_on_id_validation for name in hparams)
  if on_id_val and catalogue.source(config.data).has_id_val():
    sets[evaluate.ID_VAL] = extract(plain, which=evaluate.ID_VAL)
  test = extract(plain, which='id_test')
  fitted, id_scores = {}, {}
  for name, values in hparams.items():
    scorer = scorers.get(name).with_hparams(**values)
    stats, by_set = evaluate.fit_and_score(config, scorer, sets, {'id_test': test},
                                           params['head'] if has_head else None, model,
                                           extract, mesh)
    fitted[name], id_scores[name] = (scorer, stats), by_set['id_test']
  return params, fitted, id_scores


def export(workdir: str, out: str, *, model: str = 'auto', scorer_names: str = 'auto',
           tprs: tuple[float, ...] = (0.95,), data_dir: str | None = None) -> None:
  config = saved_config(workdir)
  # Runs saved before these fields existed ran as their defaults do.
  for field, default in (('id_train_augment', False), ('fit_on_id_validation', '')):
    if field not in config.evaluate:
      config.evaluate[field] = default
  config.evaluate.detector = dict(write=True, model=model, scorers=scorer_names, tprs=tprs)
  if data_dir:
    config.data.data_dir = data_dir
  detector_choice.check_tprs(tprs, '--tprs')
  if os.path.exists(out):
    raise UserError(f'{out} already exists: choose another --out (a detector is never '
                    'overwritten)')
  results = _results(workdir)
  model_name, names, why = detector_choice.choose(
      results['rows'], config.evaluate, {m: list(by) for m, by in results['hparams'].items()})
  mesh = parallel.make_mesh((('data', -1),))
  parallel.check_batch_size(config.evaluate.batch_size, mesh, 'evaluate.batch_size')
  data_source = catalogue.source(config.data)
  data_source.prepare()  # checks that the ID data is still there
  params, fitted, id_scores = fit_chosen(
      config, workdir, parallel.Placement(mesh), model_name,
      {n: results['hparams'][model_name][n] for n in names})
  meta = detector_format.metadata(
      config, model=model_name, num_classes=data_source.num_classes(),
      channels=data_source.channels,
      scorers=[scorer for scorer, _ in fitted.values()], id_scores=id_scores, chosen_by=why)
  detector_format.save(out, meta, params, {n: stats for n, (_, stats) in fitted.items()},
                replace=False)
  print(f'detector: {model_name} with {", ".join(names)} ({why}) in {out}')


def main(argv=None) -> None:
  parser = command_line.parser('mood_jax.export', __doc__)
  parser.add_argument('--workdir', required=True, help='a finished run of mood_jax.main')
  parser.add_argument('--out', required=True, help='the detector directory to write')
  parser.add_argument('--model', default='auto', help='finetune, logit_ft, pretrain or auto')
  parser.add_argument('--scorers', default='auto', help='comma-separated scorer names, or auto')
  parser.add_argument('--tprs', default='0.95',
                      help='ID true-positive rates of the thresholds, comma-separated')
  parser.add_argument('--data_dir', default=None,
                      help="the run's data.data_dir, if its datasets have moved")
  args = parser.parse_args(argv)
  try:
    tprs = tuple(float(t) for t in args.tprs.split(','))
  except ValueError:
    sys.exit(f'error: --tprs={args.tprs!r}: give numbers inside (0, 1), e.g. 0.95,0.99')
  try:
    export(args.workdir, args.out, model=args.model, scorer_names=args.scorers, tprs=tprs,
           data_dir=args.data_dir)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()

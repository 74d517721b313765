"""Writing a detector directory (its layout: mood_jax/detector.py), from a run's evaluation
(`evaluate.detector.write`) or by `python -m mood_jax.export`."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mood_jax.data import catalogue
from mood_jax.errors import UserError
from mood_jax.ood import detector_choice

FORMAT = 2
META_FILE = 'detector.json'
ARRAYS_DIR = 'arrays'
# The ID images thresholds are set on must be ones the network never trained on; none of our
# datasets has an ID validation split apart from the training images, so it is the ID test split.
THRESHOLD_SPLIT = 'id_test'


def preprocessing(data_cfg, channels: int) -> dict:
  """How an image becomes the network's input, as the evaluate stage does it for `data_cfg`.

  A source stored at image_size (the embedded digits) is evaluated as it is: other sizes get a
  plain resize-and-centre-crop (fraction 1). Real datasets keep their own eval crop.
  """
  fixed_size = catalogue.source(data_cfg).fixed_size
  fraction = 1.0 if fixed_size else data_cfg.eval_crop_fraction
  native = 0 if fixed_size else data_cfg.native_size
  return {'image_size': data_cfg.image_size, 'channels': channels, 'native_size': native,
          'mean': data_cfg.mean, 'std': data_cfg.std, 'crop_fraction': fraction,
          'rule': (f'converted to {"grayscale" if channels == 1 else "RGB"} (PIL); '
                   + (f'first brought to the ID set\'s {native} px (the central square of '
                      'the shorter side, bilinear; OpenOOD\'s pre_size/img_size); '
                      if native else '')
                   + f'the shorter side resized (bicubic) to {data_cfg.image_size} / '
                   f'{fraction:g} px and the central {data_cfg.image_size} px square kept'
                   + (' (an image of that size is kept as it is)' if fraction == 1 else '')
                   + '; then (x / 255 - mean) / std')}


def metadata(config: ml_collections.ConfigDict, *, model: str, num_classes: int,
             channels: int, scorers: list, id_scores: dict[str, np.ndarray],
             chosen_by: str) -> dict:
  """detector.json's content; `scorers` are configured Scorers, `id_scores` their ID-test
  scores."""
  tprs = tuple(config.evaluate.detector.tprs)
  return {
      'format': FORMAT,
      'model': {'name': model, 'config': config.model.to_dict(), 'num_classes': num_classes},
      'preprocessing': preprocessing(config.data, channels),
      'scorers': {s.name: dict(s.hparams) for s in scorers},
      'thresholds': {s.name: detector_choice.thresholds(id_scores[s.name], tprs) for s in scorers},
      'thresholds_set_on': {
          'split': THRESHOLD_SPLIT, 'examples': len(next(iter(id_scores.values()))),
          'why': 'ID images the network did not train on (the dataset has no separate ID '
                 'validation split)'},
      'chosen_by': chosen_by,
      'batch_size': config.evaluate.batch_size,
      'trained_on': {'data': config.data.name, 'id_classes': list(config.data.id_classes)},
  }


def save(directory: str, meta: dict, params, stats: dict, *, replace: bool) -> None:
  """Writes the detector beside `directory`, then moves it into place: a failure leaves any
  detector already there as it was. Without `replace`, an existing one is an error."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not replace:
    raise UserError(f'{directory} already exists: choose another --out (a detector is never '
                    'overwritten)')
  staging = f'{directory}.partial'
  if jax.process_index() == 0 and os.path.exists(staging):  # a killed earlier write
    shutil.rmtree(staging)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(staging, ARRAYS_DIR), {'params': params, 'stats': stats})
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(staging, META_FILE), 'w') as f:
      json.dump(meta, f, indent=2)
    old = f'{directory}.old'
    if os.path.exists(directory):
      os.replace(directory, old)
    os.replace(staging, directory)
    if os.path.exists(old):
      shutil.rmtree(old)
  logging.info('detector (%s: %s) in %s', meta['model']['name'], ', '.join(meta['scorers']),
               directory)


def write_from_run(directory: str, config: ml_collections.ConfigDict, rows: list[dict],
                   fitted: dict, id_scores: dict, load_params, *, replace: bool) -> None:
  """The detector `evaluate.detector` chooses among what was evaluated.

  `fitted` is {model: {scorer: (configured Scorer, stats)}}, `id_scores` {model: {scorer:
  ID test scores}}, and `load_params(model)` gives a model's params.
  """
  model, names, why = detector_choice.choose(rows, config.evaluate,
                                             {m: list(f) for m, f in fitted.items()})
  logging.info('[detector] %s with %s: %s', model, ', '.join(names), why)
  data_source = catalogue.source(config.data)
  meta = metadata(config, model=model, num_classes=data_source.num_classes(),
                  channels=data_source.channels,
                  scorers=[fitted[model][n][0] for n in names],
                  id_scores=id_scores[model], chosen_by=why)
  save(directory, meta, load_params(model), {n: fitted[model][n][1] for n in names},
       replace=replace)

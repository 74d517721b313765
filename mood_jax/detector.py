"""A trained OOD detector as a self-contained directory, and `Detector` to score new images.

    DIR/detector.json   what the detector is: the network (config.model, its classes), the
                        preprocessing, the scorers with their hparams, the decision
                        thresholds and the ID images they were set on
    DIR/arrays/         orbax checkpoint {'params': network, 'stats': {scorer: fitted stats}}

Loading needs neither the workdir, nor a config file, nor a dataset:

    from mood_jax.detector import Detector
    detector = Detector.load('workdir/digits/detector')
    result = detector.score(images)   # uint8 [N, H, W, C], or a list of image paths
    result.scores['mahalanobis_mood'], result.ood['ood_mahalanobis_mood_tpr95']

Scores are "higher = more in-distribution"; an image is flagged OOD at a threshold when
its score is below it. The threshold at ID true-positive rate 95% accepts 95% of the ID
images it was set on (the older ODIN/MOOD convention, as `fpr95_id`).
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
from absl import logging

from mood_jax import config_checks, inference, parallel
from mood_jax.data import catalogue, transforms
from mood_jax.errors import UserError
from mood_jax.models import vit
from mood_jax.ood import scorers as scorers_lib
from mood_jax.ood import sweep

FORMAT = 1
META_FILE = 'detector.json'
ARRAYS_DIR = 'arrays'
# The ID images thresholds are set on must be ones the network never trained on; none of our
# datasets has an ID validation split apart from the training images, so it is the ID test split.
THRESHOLD_SPLIT = 'id_test'


def tpr_name(tpr: float) -> str:
  return f'tpr{100 * tpr:g}'


def thresholds(id_scores: np.ndarray, tprs) -> dict[str, float]:
  """{'tpr95': t, ...}: the highest t with at least `tpr` of `id_scores` >= t."""
  ranked = np.sort(np.asarray(id_scores, np.float64))
  # The epsilon keeps (1 - 0.9) * 30 = 2.999999999999999 from flooring to 2.
  return {tpr_name(tpr): float(ranked[int(np.floor((1 - tpr) * len(ranked) + 1e-9))])
          for tpr in tprs}


# --- Which model and scorers the detector keeps. ---

def forward_options(scorer, pixel_std) -> dict:
  """`inference.make_forward`'s options for `scorer`: ODIN's input step, a layer scorer's
  own forward; none for the others."""
  if scorer.perturb is not None:
    return {'input_perturbation': functools.partial(scorer.perturb, pixel_std=pixel_std,
                                                    **scorer.hparams)}
  if scorer.forward is not None:
    return {'features_fn': functools.partial(scorer.forward, **scorer.hparams)}
  return {}


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """`evaluate.detector`'s errors, before anything runs."""
  det = cfg.detector
  if det.scorers != 'auto':
    stray = (set(config_checks.names(det.scorers))
             - {s.name for s in scorers_lib.resolve(cfg.scorers)})
    if stray:
      raise UserError(f'evaluate.detector.scorers names {sorted(stray)}, which '
                      'evaluate.scorers does not select: add them there, or set it to auto')
  if det.model != 'auto' and cfg.models != 'auto' and det.model not in cfg.models.split(','):
    raise UserError(f'evaluate.detector.model={det.model!r} is not in evaluate.models='
                    f'{cfg.models!r}: add it there, or set it to auto')
  check_tprs(det.tprs, 'evaluate.detector.tprs')


def check_tprs(tprs, what: str) -> None:
  if not tprs or not all(0 < tpr < 1 for tpr in tprs):
    raise UserError(f'{what}={tuple(tprs)}: give ID true-positive rates inside (0, 1), '
                    'e.g. 0.95')


def choose(rows: list[dict], cfg: ml_collections.ConfigDict,
           scored: dict[str, list[str]]) -> tuple[str, list[str], str]:
  """(model, scorers, why) that `evaluate.detector` names; 'auto' is the best on the
  'validation' OOD sets by `evaluate.sweep_metric` (mean over those sets). `scored` is
  {model: scorers it has scores of}, in evaluation order."""
  det = cfg.detector
  models = list(scored) if det.model == 'auto' else [det.model]
  if det.model != 'auto' and det.model not in scored:
    raise UserError(f'evaluate.detector.model={det.model!r} was not evaluated: valid: '
                    f'{list(scored)}')
  wanted = None if det.scorers == 'auto' else config_checks.names(det.scorers)
  # Each candidate is a model with one scorer ('auto') or with all the named ones.
  candidates = [(model, [s] if wanted is None else wanted) for model in models
                for s in (scored[model] if wanted is None else [None])]
  candidates = [(m, names) for m, names in candidates if set(names) <= set(scored[m])]
  if not candidates:
    raise UserError(f'no evaluated model has every scorer of evaluate.detector.scorers='
                    f'{det.scorers!r}; evaluated: {scored}')
  metric = cfg.sweep_metric
  values = {}
  for model, names in candidates:
    picked = [row[metric] for row in rows if row['model'] == model and row['scorer'] in names
              and row['ood_group'] == 'validation']
    if picked:
      values[(model, tuple(names))] = float(np.mean(picked))
  if len(candidates) == 1:
    return *candidates[0], 'as evaluate.detector names it'
  if not values:
    model, names = candidates[0]
    return model, names, ('no validation OOD set to choose on: the first model and scorer '
                          'evaluated')
  best = (max if metric in sweep.HIGHER_IS_BETTER else min)(values, key=values.get)
  return best[0], list(best[1]), (f'best mean {metric} on the validation OOD sets '
                                  f'({values[best]:.4f})')


# --- Writing. ---

def preprocessing(data_cfg, channels: int) -> dict:
  """How an image becomes the network's input, as the evaluate stage does it for `data_cfg`.

  A source stored at image_size (the embedded digits) is evaluated as it is: other sizes get a
  plain resize-and-centre-crop (fraction 1). Real datasets keep their own eval crop.
  """
  fraction = 1.0 if catalogue.source(data_cfg).fixed_size else data_cfg.eval_crop_fraction
  return {'image_size': data_cfg.image_size, 'channels': channels,
          'mean': data_cfg.mean, 'std': data_cfg.std, 'crop_fraction': fraction,
          'rule': (f'converted to {"grayscale" if channels == 1 else "RGB"} (PIL); the shorter '
                   f'side resized (bicubic) to {data_cfg.image_size} / {fraction:g} px and the '
                   f'central {data_cfg.image_size} px square kept'
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
      'thresholds': {s.name: thresholds(id_scores[s.name], tprs) for s in scorers},
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
  model, names, why = choose(rows, config.evaluate, {m: list(f) for m, f in fitted.items()})
  logging.info('[detector] %s with %s: %s', model, ', '.join(names), why)
  data_source = catalogue.source(config.data)
  meta = metadata(config, model=model, num_classes=data_source.num_classes(),
                  channels=data_source.channels,
                  scorers=[fitted[model][n][0] for n in names],
                  id_scores=id_scores[model], chosen_by=why)
  save(directory, meta, load_params(model), {n: fitted[model][n][1] for n in names},
       replace=replace)


# --- Reading and scoring. ---

@dataclasses.dataclass(frozen=True)
class Result:
  """Per-scorer scores [N], and decisions [N] bool keyed by `Detector.decision_columns`."""
  scores: dict[str, np.ndarray]
  ood: dict[str, np.ndarray]


def _check_directory(directory: str) -> dict:
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.isfile(meta_path) or not os.path.isdir(os.path.join(directory, ARRAYS_DIR)):
    raise UserError(f'{directory} is not a detector directory (no {META_FILE} and '
                    f'{ARRAYS_DIR}/): pass WORKDIR/detector or the --out of mood_jax.export')
  with open(meta_path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f'{meta_path} is not valid JSON ({e}): export the detector again') from None
  if meta.get('format') != FORMAT:
    raise UserError(f'{meta_path} has format {meta.get("format")!r}, this mood_jax reads '
                    f'{FORMAT}: export the detector again with this version')
  return meta


def read_image(path: str, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] of an image file; OSError/ValueError if it does not decode."""
  with PIL.Image.open(path) as image:
    return transforms.converted(image, channels)


def _as_channels(image: np.ndarray, channels: int) -> np.ndarray:
  if image.shape[-1] == channels:
    return image
  return transforms.converted(
      PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), channels)


@dataclasses.dataclass(frozen=True)
class Detector:
  meta: dict
  model: vit.Classifier
  params: dict
  stats: dict
  mesh: jax.sharding.Mesh

  @classmethod
  def load(cls, directory: str, mesh=None) -> 'Detector':
    """The detector in `directory`, its params replicated over `mesh` (default: every device,
    data parallel, as evaluate's default mesh)."""
    meta = _check_directory(directory)
    mesh = mesh or parallel.make_mesh((('data', -1),))
    try:
      arrays = ocp.StandardCheckpointer().restore(
          os.path.abspath(os.path.join(directory, ARRAYS_DIR)))
    except Exception as e:  # orbax and tensorstore raise many types for a damaged file
      raise UserError(f'cannot read {os.path.join(directory, ARRAYS_DIR)} '
                      f'({type(e).__name__}: {str(e)[:200]}): export the detector again') from e
    model_cfg = ml_collections.ConfigDict(meta['model']['config'])
    model = vit.Classifier(meta['model']['num_classes'], vit.encoder_from_config(model_cfg),
                           pool=model_cfg.pool)
    params = jax.device_put(arrays['params'], parallel.replicated(mesh))
    stats = {name: arrays['stats'].get(name, {}) for name in meta['scorers']}
    return cls(meta, model, params, jax.tree.map(np.asarray, stats), mesh)

  @property
  def scorers(self) -> list[scorers_lib.Scorer]:
    return [scorers_lib.get(name).with_hparams(**hparams)
            for name, hparams in self.meta['scorers'].items()]

  @property
  def image_size(self) -> int:
    return self.meta['preprocessing']['image_size']

  @property
  def channels(self) -> int:
    return self.meta['preprocessing']['channels']

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """One uint8 [H, W, C] image as uint8 [S, S, channels]: `preprocessing()['rule']`."""
    image = _as_channels(np.asarray(image, np.uint8), self.channels)
    resize = transforms.ResizeCenterCrop(self.image_size,
                                         self.meta['preprocessing']['crop_fraction'])
    return resize.map({'image': image})['image']

  def read(self, path: str) -> np.ndarray:
    """An image file as the network's uint8 input, [S, S, channels]."""
    return self.prepare(read_image(path, self.channels))

  @functools.cached_property
  def forwards(self) -> dict:
    """A jitted forward pass per scorer: ODIN's moves the inputs first, layer scorers read
    their layers, the rest share one."""
    plain = inference.make_forward(self.model, self.mesh)
    std = self.meta['preprocessing']['std']
    return {s.name: inference.make_forward(self.model, self.mesh, **forward_options(s, std))
            if s.perturb or s.forward else plain for s in self.scorers}

  @property
  def batch_size(self) -> int:
    """The evaluate batch size, rounded up to a multiple of the batch's devices."""
    devices = int(np.prod([self.mesh.shape[a] for a in parallel.batch_axes(self.mesh)]))
    return -(-self.meta['batch_size'] // devices) * devices

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """uint8 images -> the network's float32 input: (x / 255 - mean) / std."""
    pre = self.meta['preprocessing']
    return transforms.Normalize(pre['mean'], pre['std']).map({'image': images})['image']

  def features_and_logits(self, images: np.ndarray, scorer: str) -> tuple[np.ndarray, ...]:
    """(features, logits) of prepared uint8 images [N, S, S, C], in fixed-shape batches."""
    forward, size = self.forwards[scorer], self.batch_size
    parts = []
    for start in range(0, len(images), size):
      batch = images[start:start + size]
      padded = np.zeros((size, *batch.shape[1:]), np.uint8)
      padded[:len(batch)] = batch
      features, logits = forward(self.params, parallel.global_batch(
          {'image': self.normalize(padded)}, self.mesh)['image'])
      parts.append(jax.tree.map(lambda x, n=len(batch): np.asarray(x)[:n], (features, logits)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

  def score_prepared(self, images: np.ndarray) -> Result:
    """Scores and decisions of uint8 images already [N, S, S, channels] (see `prepare`)."""
    scores, cache = {}, {}
    for scorer in self.scorers:
      key = self.forwards[scorer.name]
      if key not in cache:
        cache[key] = self.features_and_logits(images, scorer.name)
      features, logits = cache[key]
      scores[scorer.name] = scorers_lib.score(scorer, self.stats[scorer.name], features,
                                              logits, mesh=self.mesh)
    return Result(scores, self.decisions(scores))

  @property
  def _thresholds(self) -> dict[str, tuple[str, float]]:
    """{'ood_<scorer>_tpr95': (scorer, threshold)} for every scorer and threshold."""
    return {f'ood_{name}_{tpr}': (name, value)
            for name, by_tpr in self.meta['thresholds'].items() for tpr, value in by_tpr.items()}

  @property
  def decision_columns(self) -> list[str]:
    return list(self._thresholds)

  def decisions(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{decision column: score < threshold}: below it, an image is flagged OOD."""
    return {column: scores[name] < value for column, (name, value) in self._thresholds.items()}

  def score(self, images) -> Result:
    """Scores and decisions of a uint8 array [N, H, W, C] or a list of image paths; images of
    another size or channel count go through `prepare`. An unreadable path is a UserError."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (
        self.image_size, self.image_size, self.channels):
      return self.score_prepared(images.astype(np.uint8))
    prepared = []
    for image in images:
      if isinstance(image, (str, os.PathLike)):
        try:
          image = read_image(os.fspath(image), self.channels)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
          raise UserError(f'{image}: cannot read it as an image ({e})') from None
      prepared.append(self.prepare(image))
    if not prepared:
      raise UserError('no images to score')
    return self.score_prepared(np.stack(prepared))


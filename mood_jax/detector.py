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

Which model and scorers a detector keeps: mood_jax/ood/detector_choice.py; writing the
directory: mood_jax/ood/detector_format.py.
"""

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image

from mood_jax import parallel
from mood_jax.data import transforms
from mood_jax.errors import UserError
from mood_jax.models import vit
from mood_jax.ood import extraction, scorers as scorers_lib
from mood_jax.ood.detector_format import ARRAYS_DIR, FORMAT, META_FILE


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
    example = {'image': _as_channels(np.asarray(image, np.uint8), self.channels)}
    pre = self.meta['preprocessing']
    if pre['native_size']:
      example = transforms.ToNativeSize(pre['native_size']).map(example)
    return transforms.ResizeCenterCrop(self.image_size, pre['crop_fraction']).map(example)['image']

  def read(self, path: str) -> np.ndarray:
    """An image file as the network's uint8 input, [S, S, channels]."""
    return self.prepare(read_image(path, self.channels))

  @functools.cached_property
  def forwards(self) -> dict:
    """A jitted forward pass per scorer: ODIN's moves the inputs first, layer scorers read
    their layers, the rest share one."""
    plain = extraction.make_forward(self.model, self.mesh)
    std = self.meta['preprocessing']['std']
    return {s.name: extraction.make_forward(self.model, self.mesh,
                                            **extraction.forward_options(s, std))
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


"""The embedded data, data.name='digits': TFDS builders for images bundled with scikit-learn /
scikit-image / Pillow (ID digits, OOD sets), and the Source that reads them.

Both are grayscale uint8 [S, S, 1], PNG-encoded with PIL and meant to be written as ArrayRecord, so
nothing on the write or read path needs TensorFlow. Every image is a function of the builder config.
"""

import dataclasses
import io
import string
import zlib

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import skimage
import sklearn.datasets
import sklearn.model_selection
import tensorflow_datasets as tfds

from mood_jax.data.sources import source
from mood_jax.data.sources.location import Location

NAME = 'digits'
NUM_DIGIT_CLASSES = 10
HELDOUT_SET = NAME + source.HELDOUT_SUFFIX  # the test digits outside data.id_classes (near)
# The train images of data.heldout_validation_classes (near-OOD validation).
HELDOUT_VALIDATION_SET = NAME + source.HELDOUT_VALIDATION_SUFFIX
FAR_OOD_SETS = ('textures', 'photos', 'lfw_faces', 'uniform_noise', 'gaussian_blobs')
# For choosing hyperparameters (gamma, keep ratios, scorer settings): never a test set.
VALIDATION_OOD_SETS = ('letters',)

_TEXTURES = ('brick', 'grass', 'gravel', 'immunohistochemistry')
# skimage's `cat` is `chelsea` again, so it is left out.
_PHOTOS = ('camera', 'astronaut', 'coffee', 'chelsea', 'rocket', 'coins', 'moon', 'clock',
           'hubble_deep_field')
_LFW_FACES = 100  # lfw_subset: the first 100 are faces, the last 100 background crops.
_CROP_FRACTION = (0.25, 0.75)  # crop side, as a fraction of the source image's shorter side


@dataclasses.dataclass(eq=False, kw_only=True)
class DigitsConfig(tfds.core.BuilderConfig):
  """`MoodDigits` settings; the name spells them out, so that no two share a directory."""
  name: str = dataclasses.field(init=False)
  image_size: int = 32
  test_fraction: float = 0.3
  split_seed: int = 0

  def __post_init__(self):
    self.name = f'{self.image_size}px_seed{self.split_seed}_test{self.test_fraction}'


@dataclasses.dataclass(eq=False, kw_only=True)
class EmbeddedOodConfig(tfds.core.BuilderConfig):
  """`MoodEmbeddedOod` settings, named like `DigitsConfig`."""
  name: str = dataclasses.field(init=False)
  image_size: int = 32
  examples_per_set: int = 500
  seed: int = 0

  def __post_init__(self):
    self.name = f'{self.image_size}px_seed{self.seed}_n{self.examples_per_set}'


def _png(image: np.ndarray) -> bytes:
  """PIL rather than tfds' own encoder, which would need TensorFlow."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0]).save(buffer, format='PNG')
  return buffer.getvalue()


def _to_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W] floats in [0, 1] -> uint8 [size, size, 1], bilinear with antialiasing."""
  resized = skimage.transform.resize(image, (size, size), order=1, anti_aliasing=True)
  return np.round(resized * 255).astype(np.uint8)[..., None]


def _gray(image: np.ndarray) -> np.ndarray:
  """Grayscale floats in [0, 1]."""
  return skimage.util.img_as_float(skimage.color.rgb2gray(image) if image.ndim == 3 else image)


def _random_crops(names, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """Square crops of random position and scale from the named skimage images."""
  images = [_gray(getattr(skimage.data, name)()) for name in names]

  def crop():
    image = images[rng.integers(len(images))]
    side = int(rng.uniform(*_CROP_FRACTION) * min(image.shape))
    top = rng.integers(image.shape[0] - side + 1)
    left = rng.integers(image.shape[1] - side + 1)
    return _to_uint8(image[top:top + side, left:left + side], size)

  return np.stack([crop() for _ in range(n)])


def _textures(rng, n, size):
  return _random_crops(_TEXTURES, rng, n, size)


def _photos(rng, n, size):
  return _random_crops(_PHOTOS, rng, n, size)


def _lfw_faces(rng, n, size):
  """A random `n` of the faces (all of them when `n` is at least their number)."""
  faces = skimage.data.lfw_subset()[:_LFW_FACES]
  chosen = np.sort(rng.choice(len(faces), size=min(n, len(faces)), replace=False))
  return np.stack([_to_uint8(faces[i], size) for i in chosen])


def _uniform_noise(rng, n, size):
  return rng.integers(0, 256, size=(n, size, size, 1), dtype=np.uint8)


def _gaussian_blobs(rng, n, size):
  """Sums of 1-5 Gaussian bumps of random centre, width and height, stretched to 0..255."""
  rows, cols = np.mgrid[:size, :size]

  def blobs():
    count = rng.integers(1, 6)
    centres = rng.uniform(0, size, (count, 2, 1, 1))
    widths = rng.uniform(size / 16, size / 4, (count, 1, 1))
    heights = rng.uniform(0.5, 1.0, (count, 1, 1))
    squared_distances = (rows - centres[:, 0]) ** 2 + (cols - centres[:, 1]) ** 2
    field = (heights * np.exp(-squared_distances / (2 * widths ** 2))).sum(axis=0)
    field = (field - field.min()) / (field.max() - field.min())
    return np.round(field * 255).astype(np.uint8)[..., None]

  return np.stack([blobs() for _ in range(n)])


def _letters(rng, n, size):
  """Latin letters drawn the way sklearn's digits are: a bright glyph in Pillow's bundled
  font at a random slant and thickness, fitted to its box, then 8x8 with 17 grey levels."""
  font = PIL.ImageFont.load_default(size=48)

  def letter():
    canvas = PIL.Image.new('L', (96, 96))
    PIL.ImageDraw.Draw(canvas).text(
        (48, 48), string.ascii_letters[rng.integers(len(string.ascii_letters))], fill=255,
        font=font, anchor='mm', stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    glyph = np.asarray(canvas.rotate(rng.uniform(-15, 15), resample=PIL.Image.BILINEAR))
    rows, cols = np.nonzero(glyph)
    side = max(np.ptp(rows), np.ptp(cols)) + 9  # square box, a few pixels of margin
    top = max(0, (rows.min() + rows.max() - side) // 2)
    left = max(0, (cols.min() + cols.max() - side) // 2)
    box = glyph[top:top + side, left:left + side] / 255
    coarse = skimage.transform.resize(box, (8, 8), anti_aliasing=True)
    return _to_uint8(np.round(coarse * 16) / 16, size)

  return np.stack([letter() for _ in range(n)])


_OOD_IMAGES = {
    'textures': _textures,
    'photos': _photos,
    'lfw_faces': _lfw_faces,
    'uniform_noise': _uniform_noise,
    'gaussian_blobs': _gaussian_blobs,
    'letters': _letters,
}


def _features(size: int, **others: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(size, size, 1), encoding_format='png'), **others})


class _Bundled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generated from data installed with Python packages: nothing to download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # tfds looks beside a builder's source for checksums of its downloads; there are none, and
  # that look-up needs `importlib_resources`, which tfds uses but does not declare on Python 3.11.
  code_path = None
  # A default instead of BUILDER_CONFIGS: tfds refuses a second config object under a registered
  # config's name, and configs here are plain values made on demand.
  _CONFIG: type[tfds.core.BuilderConfig]

  def get_default_builder_config(self) -> tfds.core.BuilderConfig:
    return self._CONFIG()


class MoodDigits(_Bundled):
  """scikit-learn's 1,797 8x8 digits, resized, with a seeded stratified train/test split."""

  _CONFIG = DigitsConfig

  def _info(self) -> tfds.core.DatasetInfo:
    # `id` is the index in load_digits(), to trace any example back to its source.
    features = _features(self.builder_config.image_size,
                         label=tfds.features.ClassLabel(num_classes=NUM_DIGIT_CLASSES),
                         id=tfds.features.Scalar(np.int64))
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features,
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with scikit-learn
    digits = sklearn.datasets.load_digits()
    train, test = sklearn.model_selection.train_test_split(
        np.arange(len(digits.target)), test_size=self.builder_config.test_fraction,
        stratify=digits.target, random_state=self.builder_config.split_seed)
    return {'train': self._generate_examples(digits, train),
            'test': self._generate_examples(digits, test)}

  def _generate_examples(self, digits, ids):
    for i in ids:
      image = _to_uint8(digits.images[i] / 16, self.builder_config.image_size)
      yield int(i), {'image': _png(image), 'label': digits.target[i], 'id': i}


class MoodEmbeddedOod(_Bundled):
  """OOD sets in the digits' format, one split each; every label is -1."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.', '1.1.0': 'Adds the letters validation set.'}
  _CONFIG = EmbeddedOodConfig

  def _info(self) -> tfds.core.DatasetInfo:
    features = _features(self.builder_config.image_size, label=tfds.features.Scalar(np.int64))
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the images ship with scikit-image and Pillow
    return {name: self._generate_examples(name)
            for name in FAR_OOD_SETS + VALIDATION_OOD_SETS}

  def _generate_examples(self, name):
    config = self.builder_config
    # One stream per set, keyed by its name, so sets do not change when others are added.
    rng = np.random.default_rng([config.seed, zlib.crc32(name.encode())])
    images = _OOD_IMAGES[name](rng, config.examples_per_set, config.image_size)
    for i, image in enumerate(images):
      yield i, {'image': _png(image), 'label': -1}


def digits_location(data_cfg, split: str) -> Location:
  """The digits' `split` ('train' or 'test') at data.image_size, made as `data_cfg` says."""
  config = DigitsConfig(image_size=data_cfg.image_size, test_fraction=data_cfg.test_fraction,
                        split_seed=data_cfg.split_seed)
  return Location(NAME, MoodDigits.name, split, config, encoded=False, generated=True)


def ood_location(name: str, data_cfg) -> Location | None:
  """Where embedded OOD set `name` (FAR_OOD_SETS, VALIDATION_OOD_SETS) is, made at
  data.image_size; None if it is not one of them."""
  if name not in FAR_OOD_SETS + VALIDATION_OOD_SETS:
    return None
  # The builder's own seed, not split_seed: OOD sets stay fixed while ID splits vary.
  config = EmbeddedOodConfig(image_size=data_cfg.image_size,
                             examples_per_set=data_cfg.ood_examples_per_set)
  return Location(name, MoodEmbeddedOod.name, name, config, encoded=False, generated=True)


class EmbeddedSource(source.Source):
  """The digits and the OOD sets above, each built in data_dir when first read."""

  NAMES = (NAME,)
  channels = 1
  fixed_size = True
  own_ood_sets = FAR_OOD_SETS + VALIDATION_OOD_SETS

  def class_label(self) -> tfds.features.ClassLabel:
    return tfds.features.ClassLabel(num_classes=NUM_DIGIT_CLASSES)

  def _id_location(self, which: str) -> Location:
    return digits_location(self.cfg, 'train' if which == 'id_train' else 'test')

  def _own_ood_location(self, name: str) -> Location | None:
    return ood_location(name, self.cfg)

  def ood_group(self, name: str) -> str:
    return 'validation' if name in VALIDATION_OOD_SETS else super().ood_group(name)

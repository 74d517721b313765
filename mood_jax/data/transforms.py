"""Per-example preprocessing as picklable grain transforms, so that worker processes can run them.

Examples are dicts with 'image' (encoded bytes before `Decode`, then uint8 [H, W, C], then float32
after `Normalize`) and 'label'. Random transforms draw from the generator grain gives them, which
`MapDataset.seed` makes a function of (seed, position in the stream): runs repeat exactly.
"""

import dataclasses
import io
import math

import grain
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import simplejpeg

from mood_jax.errors import UserError

_BICUBIC = PIL.Image.Resampling.BICUBIC  # BEiT's and MOOD's interpolation
_BILINEAR = PIL.Image.Resampling.BILINEAR  # OpenOOD's (evaluation_api/preprocessor.py)


def converted(image: PIL.Image.Image, channels: int) -> np.ndarray:
  """uint8 [H, W, channels]: RGB (3), or grayscale (1) by PIL's ITU-R 601-2 luma; alpha is
  dropped."""
  array = np.asarray(image.convert('RGB' if channels == 3 else 'L'))
  return array if channels == 3 else array[..., None]


# JPEGs decode through simplejpeg (libjpeg-turbo's own API): 1.46x PIL's rate on one core,
# the same pixels (benchmarks/input_pipeline.py; README "Performance on accelerators").
DEFAULT_DECODER = 'simplejpeg'
# Largest |simplejpeg - PIL| per pixel accepted, in uint8 levels: decoders may round the
# inverse DCT differently by a level. Both run libjpeg-turbo with the accurate IDCT and fancy
# chroma upsampling, and agree exactly on every JPEG the tests and the benchmark decode.
DECODER_TOLERANCE = 1


def decode_jpeg(data: bytes, channels: int) -> np.ndarray | None:
  """uint8 [H, W, 3] of a YCbCr or grayscale JPEG through simplejpeg, or None for anything
  else: another format, CMYK (libjpeg-turbo's RGB of it is not PIL's), or one channel asked
  for (PIL's ITU-R 601-2 luma of the RGB is not the JPEG's own luma channel)."""
  if channels != 3 or data[:2] != b'\xff\xd8':  # JPEG's start-of-image marker
    return None
  try:
    if simplejpeg.decode_jpeg_header(data)[2] not in ('YCbCr', 'Gray'):
      return None
    return simplejpeg.decode_jpeg(data, colorspace='RGB')
  except ValueError:  # damaged: PIL's error names the problem
    return None


@dataclasses.dataclass(frozen=True)
class Decode(grain.transforms.MapWithIndex):
  """Encoded bytes (any format PIL reads) -> uint8 [H, W, channels] (`converted`): JPEGs
  through `decode_jpeg`, the rest, and any JPEG it cannot decode, through PIL.

  An image that fails to decode is reported by dataset and index instead of a PIL traceback.
  """
  dataset: str
  channels: int = 3

  def map_with_index(self, index, example):
    rgb = decode_jpeg(example['image'], self.channels)
    if rgb is not None:
      return {**example, 'image': rgb}
    try:
      with PIL.Image.open(io.BytesIO(example['image'])) as image:
        rgb = converted(image, self.channels)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
      # A UserError: the command line reports it in one line, without a traceback.
      raise UserError(f'{self.dataset}: example {index} does not decode as an image ({e}); '
                      'rebuild the dataset from intact files') from None
    return {**example, 'image': rgb}


def _resized(image: np.ndarray, size: int, box: tuple[int, int, int, int],
             resample=_BICUBIC) -> np.ndarray:
  """The (left, top, right, bottom) box of `image`, resized to [size, size]; a grayscale
  [H, W, 1] image stays [size, size, 1] (PIL reads it as [H, W])."""
  pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  return np.asarray(pil.resize((size, size), resample, box=box)).reshape(size, size, -1)


def _central_box(image: np.ndarray, fraction: float) -> tuple[float, float, float, float]:
  """The central square of `fraction` of the shorter side, as (left, top, right, bottom)."""
  height, width = image.shape[:2]
  side = min(height, width) * fraction
  top, left = (height - side) / 2, (width - side) / 2
  return left, top, left + side, top + side


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop(grain.transforms.Map):
  """Eval: the shorter side to size / crop_fraction, then the central size x size.

  Done as one resize of the central box, which equals resize-then-crop up to rounding.
  """
  size: int
  crop_fraction: float = 0.875  # BEiT (timm) at 224 px: resize to 256, crop 224

  def map(self, example):
    image = example['image']
    return {**example, 'image': _resized(image, self.size, _central_box(image, self.crop_fraction))}


@dataclasses.dataclass(frozen=True)
class ToNativeSize(grain.transforms.Map):
  """Every image, ID and OOD, first to the ID set's native size x size: OpenOOD's test
  preprocessor (openood/evaluation_api/preprocessor.py: Resize(pre_size) bilinear, then
  CenterCrop(img_size); 32 and 32 for CIFAR), so that no OOD set arrives sharper than the ID
  set it is told from. An image of that size already passes unchanged."""
  size: int

  def map(self, example):
    image = example['image']
    if image.shape[:2] == (self.size, self.size):
      return example
    return {**example,
            'image': _resized(image, self.size, _central_box(image, 1.0), _BILINEAR)}


# torchvision's ColorJitter adjusts a PIL image with these enhancers (its functional_pil.py).
_JITTERS = (PIL.ImageEnhance.Brightness, PIL.ImageEnhance.Contrast, PIL.ImageEnhance.Color)


@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
  """Brightness, contrast and saturation, each scaled by a factor uniform in
  [1 - strength, 1 + strength], in a random order: torchvision's ColorJitter(s, s, s), which
  BEiT's pretraining applies first (microsoft/unilm beit/datasets.py DataAugmentationForBEiT).
  By hand: grain has no colour ops, and torchvision is not a dependency."""
  strength: float

  def random_map(self, example, rng: np.random.Generator):
    image = PIL.Image.fromarray(example['image'])
    for jitter in rng.permutation(len(_JITTERS)):
      factor = rng.uniform(max(0.0, 1 - self.strength), 1 + self.strength)
      image = _JITTERS[jitter](image).enhance(factor)
    return {**example, 'image': np.asarray(image)}


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
  """Train: a random box of `scale` of the area and `ratio` aspect, resized to size x size, then
  a horizontal flip with probability `flip` (Inception's crop, as torchvision and timm do it)."""
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: float = 0.5
  attempts: int = 10

  def _box(self, height: int, width: int, rng: np.random.Generator):
    area = height * width
    log_ratio = np.log(self.ratio)
    for _ in range(self.attempts):
      target = area * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
      if 0 < w <= width and 0 < h <= height:
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        return left, top, left + w, top + h
    # No box fitted: the central crop of the whole image, its aspect clipped to `ratio`.
    aspect = np.clip(width / height, *self.ratio)
    w, h = (width, round(width / aspect)) if aspect <= width / height else (
        round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h

  def random_map(self, example, rng: np.random.Generator):
    image = example['image']
    crop = _resized(image, self.size, self._box(*image.shape[:2], rng))
    if rng.uniform() < self.flip:
      crop = crop[:, ::-1]
    return {**example, 'image': np.ascontiguousarray(crop)}


@dataclasses.dataclass(frozen=True)
class RandomTranslate(grain.transforms.RandomMap):
  """Shifts by up to `pad` pixels each way: zero-pad, then crop the original size back out.

  For the digits: zeros are their background; no flips, as digits are not mirror-symmetric.
  """
  pad: int

  def random_map(self, example, rng: np.random.Generator):
    image = example['image']
    height, width = image.shape[:2]
    padded = np.pad(image, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)))
    top, left = rng.integers(0, 2 * self.pad + 1, size=2)
    return {**example, 'image': padded[top:top + height, left:left + width]}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """uint8 image -> float32 (x / 255 - mean) / std; mean and std are scalars or per channel."""
  mean: float | tuple[float, ...]
  std: float | tuple[float, ...]

  def map(self, example):
    image = example['image'].astype(np.float32) / 255
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    return {**example, 'image': (image - mean) / std}


@dataclasses.dataclass(frozen=True)
class RandomErasing(grain.transforms.RandomMap):
  """With probability `prob`, one box of `scale` of the area and log-uniform `ratio` aspect is
  replaced by standard normal noise per pixel (timm's mode 'pixel', after normalisation)."""
  prob: float
  scale: tuple[float, float] = (0.02, 1 / 3)
  ratio: tuple[float, float] = (0.3, 1 / 0.3)
  attempts: int = 10

  def random_map(self, example, rng: np.random.Generator):
    if self.prob <= 0 or rng.uniform() >= self.prob:
      return example
    image = example['image']
    height, width = image.shape[:2]
    for _ in range(self.attempts):
      target = height * width * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*np.log(self.ratio)))
      h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
      if 0 < h < height and 0 < w < width:
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        erased = image.copy()
        erased[top:top + h, left:left + w] = rng.standard_normal(
            (h, w, image.shape[2])).astype(image.dtype)
        return {**example, 'image': erased}
    return example

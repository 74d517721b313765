"""RandAugment as BEiT fine-tunes with it: timm's 'rand-m9-mstd0.5-inc1' policy, written with PIL.

Each of `num_ops` operations, drawn with replacement from the 'increasing' set (a larger magnitude
is always a stronger change), applies with probability 0.5 at a magnitude drawn from
N(magnitude, magnitude_std) clipped to [0, 10]. Signed operations pick their sign at random.
"""

import dataclasses

import grain
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps

_MAX = 10.0
_FILL = (128, 128, 128)  # timm fills with the normalisation mean, 0.5 here


def _signed(value, rng):
  return value if rng.uniform() < 0.5 else -value


def _affine(image, matrix):
  return image.transform(image.size, PIL.Image.Transform.AFFINE, matrix,
                         resample=PIL.Image.Resampling.BILINEAR, fillcolor=_FILL)


def _enhance(enhancer):
  # Factor 1 +- 0.9 at full magnitude.
  return lambda image, m, rng: enhancer(image).enhance(1 + _signed(m / _MAX * 0.9, rng))


def _solarize_add(image, m, rng):
  del rng
  pixels = np.asarray(image).astype(np.int16)
  added = np.where(pixels < 128, np.minimum(pixels + int(m / _MAX * 110), 255), pixels)
  return PIL.Image.fromarray(added.astype(np.uint8))


def _posterize(image, m, rng):
  del rng
  bits = 4 - int(m / _MAX * 4)
  # PIL wants 1..8 bits; timm's 0 bits at magnitude 10 would be an all-black image.
  return PIL.ImageOps.posterize(image, bits) if bits else PIL.Image.new('RGB', image.size)


_OPS = {
    'auto_contrast': lambda image, m, rng: PIL.ImageOps.autocontrast(image),
    'equalize': lambda image, m, rng: PIL.ImageOps.equalize(image),
    'invert': lambda image, m, rng: PIL.ImageOps.invert(image),
    'rotate': lambda image, m, rng: image.rotate(
        _signed(m / _MAX * 30, rng), resample=PIL.Image.Resampling.BILINEAR, fillcolor=_FILL),
    'posterize': _posterize,
    'solarize': lambda image, m, rng: PIL.ImageOps.solarize(image, 256 - int(m / _MAX * 256)),
    'solarize_add': _solarize_add,
    'color': _enhance(PIL.ImageEnhance.Color),
    'contrast': _enhance(PIL.ImageEnhance.Contrast),
    'brightness': _enhance(PIL.ImageEnhance.Brightness),
    'sharpness': _enhance(PIL.ImageEnhance.Sharpness),
    'shear_x': lambda image, m, rng: _affine(image, (1, _signed(m / _MAX * 0.3, rng), 0, 0, 1, 0)),
    'shear_y': lambda image, m, rng: _affine(image, (1, 0, 0, _signed(m / _MAX * 0.3, rng), 1, 0)),
    'translate_x': lambda image, m, rng: _affine(
        image, (1, 0, _signed(m / _MAX * 0.45, rng) * image.size[0], 0, 1, 0)),
    'translate_y': lambda image, m, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(m / _MAX * 0.45, rng) * image.size[1])),
}
OPS = tuple(_OPS)


@dataclasses.dataclass(frozen=True)
class RandAugment(grain.transforms.RandomMap):
  """uint8 RGB [H, W, 3] -> the same, after up to `num_ops` random operations."""
  num_ops: int = 2             # BEiT/timm default
  magnitude: float = 9.0       # 'm9'
  magnitude_std: float = 0.5   # 'mstd0.5'
  prob: float = 0.5            # timm's per-operation probability

  def random_map(self, example, rng: np.random.Generator):
    image = PIL.Image.fromarray(example['image'])
    for name in rng.choice(OPS, self.num_ops):
      if rng.uniform() >= self.prob:
        continue
      m = float(np.clip(rng.normal(self.magnitude, self.magnitude_std), 0, _MAX))
      image = _OPS[name](image, m, rng)
    return {**example, 'image': np.asarray(image)}

"""Loader throughput of the ImageNet train transform: grain with 0, 1, 2 workers vs a PIL loop.

    python -m benchmarks.input_pipeline [--images=256] [--batch=32]

The transform is configs/imagenet.py's (decode JPEG -> RandomResizedCrop 224 + flip ->
RandAugment m9 -> normalise -> random erasing) on generated 500x375 JPEGs (ImageNet's typical
size) held in memory, so disk is not measured.
Rates exclude the first batch (worker start-up). Per core = images/s / the cores the loader can
use: 1 for the loop; with 0 workers grain's read threads run in this process and can use every
core (PIL releases the GIL), with N workers min(N, cores).
"""

import argparse
import io
import os
import runpy
import time

from absl import flags
import grain
import numpy as np
import PIL.Image

from mood_jax.data import input_pipeline, transforms

SIZE = 224
# ViT-L/16 at 224 px, a training step: 372 GFLOPs an image, XLA's count for configs/imagenet.py's
# finetune step (`--config.dry_run=True`: 2976 GFLOPs for 8 images a device); forward ~1/3 of
# it, 2 x the 61.6 G multiply-adds of Dosovitskiy et al. 2021, table 6.
# TPU v4: 275 bf16 TFLOP/s a chip; 4 chips and 240 vCPUs (120 cores) a host.
VIT_L16_TRAIN_FLOPS = 372e9
TPU_V4_CHIP_FLOPS, TPU_V4_CHIPS_PER_HOST, TPU_V4_HOST_CORES = 275e12, 4, 120


def jpegs(count: int, seed: int = 0) -> list[bytes]:
  """Photo-like 500x375 JPEGs (smooth gradients plus noise, quality 90)."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:375, :500]
  out = []
  for _ in range(count):
    base = np.stack([np.sin(rows / rng.uniform(20, 80) + rng.uniform(0, 6)) * 100 + 128,
                     np.cos(cols / rng.uniform(20, 80)) * 100 + 128,
                     (rows + cols) / 875 * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    out.append(buffer.getvalue())
  return out


def train_ops() -> list:
  config_file = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'imagenet.py')
  data = runpy.run_path(config_file)['get_config']('').data
  assert data.image_size == SIZE
  return input_pipeline.train_transforms(data)


def pil_loop(images: list[bytes]) -> float:
  """The same work, one image at a time in plain Python: images/s."""
  decode, ops = transforms.Decode('benchmark'), train_ops()
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for i, image in enumerate(images):
    example = decode.map_with_index(i, {'image': image})
    for op in ops:
      example = (op.random_map(example, rng) if isinstance(op, grain.transforms.RandomMap)
                 else op.map(example))
  return len(images) / (time.perf_counter() - start)


def grain_loader(images: list[bytes], workers: int, batch: int) -> float:
  """images/s of a grain pipeline over `images`, after its first batch."""
  ds = grain.MapDataset.source([{'image': image} for image in images]).seed(0)
  ds = input_pipeline.apply(ds.map_with_index(transforms.Decode('benchmark')), train_ops())
  ds = ds.to_iter_dataset().batch(batch, drop_remainder=True)
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  iterator = iter(ds)
  next(iterator)  # start-up
  start, count = time.perf_counter(), 0
  for element in iterator:
    count += len(element['image'])
  return count / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--images', type=int, default=256)
  parser.add_argument('--batch', type=int, default=32)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  images = jpegs(args.images)
  baseline = pil_loop(images)
  cores = os.cpu_count()
  steps = ' -> '.join(type(op).__name__ for op in train_ops())
  print(f'{cores} cores; {args.images} JPEGs 500x375 -> Decode -> {steps}')
  print(f'{"loader":<18}{"images/s":>10}{"per core":>10}{"vs PIL loop":>13}')
  print(f'{"PIL loop":<18}{baseline:>10.1f}{baseline:>10.1f}{1.0:>13.2f}')
  for workers in (0, 1, 2):
    rate = grain_loader(images, workers, args.batch)
    used = min(workers, cores) if workers else cores
    print(f'{f"grain, {workers} workers":<18}{rate:>10.1f}{rate / used:>10.1f}'
          f'{rate / baseline:>13.2f}')
  need = TPU_V4_CHIP_FLOPS * 0.5 / VIT_L16_TRAIN_FLOPS * TPU_V4_CHIPS_PER_HOST
  print(f'TPU v4 host, ViT-L/16 training at 50% MFU: ~{need:.0f} images/s, '
        f'{need / TPU_V4_HOST_CORES:.0f} images/s per host core')


if __name__ == '__main__':
  main()

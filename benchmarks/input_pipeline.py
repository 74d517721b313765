"""Input pipeline per core: JPEG decoders x ImageNet transforms, then grain with 0..N workers.

    pip install -r benchmarks/requirements.txt   # OpenCV, for its decoder's row
    nice -n 10 python -m benchmarks.input_pipeline [--images=48] [--repeats=5] [--workers=2]
        [--out=benchmarks/results/input_pipeline.json]

On generated 500x375 JPEGs (ImageNet's typical size; photo-like gradients plus noise, quality
90, 4:2:0 chroma as PIL saves them) held in memory, so disk is not measured:

  decoders    PIL (Image.open + convert, the decoder before this benchmark), OpenCV
              (cv2.imdecode, one thread) and simplejpeg (libjpeg-turbo's own API), each on
              its own and followed by configs/imagenet.py's train transform (RandomResizedCrop
              224 + flip -> RandAugment m9 -> normalise -> random erasing) and its eval
              transform (resize 256, centre crop 224 -> normalise), one image at a time in
              this process: images per CPU second, the rate of one core. Medians of
              --repeats passes over the images.
              Each decoder's pixels are compared with PIL's (max and mean |difference|).
  grain       the train pipeline as training builds it (transforms.Decode, the default
              decoder), batched, with 0..--workers worker processes: images/s (wall time)
              after the first batch, and per core = images/s / the cores it can use (N
              workers: min(N, cores); 0 workers: grain's read threads in this process, every
              core). On a shared machine these are lower bounds: others' load counts here.

Then what it takes to feed an accelerator: images/s of one chip at 50% MFU, from the dry run's
FLOPs per image of configs/imagenet.py's fine-tune step (BEiT-L/16 at 224), over the measured
train transform's images/s per core.
"""

import argparse
import io
import json
import os
import platform
import runpy
import statistics
import time

import grain
import numpy as np
import PIL
import PIL.Image
from absl import flags

from mood_jax.data import input_pipeline, transforms

SIZE = 224
# XLA's count for configs/imagenet.py's finetune step (BEiT-L/16 at 224, bfloat16, fused
# attention), per image: `--config.dry_run=True --config.dry_run_devices=8
# --config.stages=finetune` prints 5920.0 GFLOPs a step per device for its 16 images a device.
# About 3x the forward's 2 x 61.6 G multiply-adds (Dosovitskiy et al. 2021, table 6).
VIT_L16_TRAIN_FLOPS = 5920e9 / 16
TARGET_MFU = 0.5
# Dense bf16 peak per chip (mood_jax/train/utilisation.py's table and sources).
CHIPS = {'H100 SXM': 989e12, 'TPU v4': 275e12}


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


def _pil(data: bytes) -> np.ndarray:
  with PIL.Image.open(io.BytesIO(data)) as image:
    return transforms.converted(image, 3)


def _opencv(data: bytes) -> np.ndarray:
  import cv2  # noqa: PLC0415 (benchmarks/requirements.txt: optional for the rest)
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def _simplejpeg(data: bytes) -> np.ndarray:
  return transforms.decode_jpeg(data, 3)


DECODERS = {'PIL': _pil, 'OpenCV': _opencv, 'simplejpeg': _simplejpeg}


def imagenet_data():
  config_file = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'imagenet.py')
  data = runpy.run_path(config_file)['get_config']('').data
  assert data.image_size == SIZE
  return data


def _apply(ops, example: dict, rng) -> dict:
  for op in ops:
    example = (op.random_map(example, rng) if isinstance(op, grain.transforms.RandomMap)
               else op.map(example))
  return example


def per_core(decode, ops, images: list[bytes], repeats: int) -> float:
  """Median images per CPU second of `decode` then `ops`, one image at a time in this
  process (one thread): the rate of one core of its own, even on a machine other processes
  share, which wall time would count against it."""
  rates = []
  for repeat in range(repeats):
    rng = np.random.default_rng(repeat)
    start = time.process_time()
    for image in images:
      _apply(ops, {'image': decode(image)}, rng)
    rates.append(len(images) / (time.process_time() - start))
  return statistics.median(rates)


def pixel_difference(decode, images: list[bytes]) -> dict:
  """Max and mean |decoded - PIL's| over the images, in uint8 levels."""
  diffs = [np.abs(decode(image).astype(np.int16) - _pil(image).astype(np.int16))
           for image in images]
  return {'max_abs': int(max(d.max() for d in diffs)),
          'mean_abs': float(np.mean([d.mean() for d in diffs]))}


def grain_rate(images: list[bytes], workers: int, batch: int) -> float:
  """images/s of the train pipeline in grain over `images` (repeated to 8 batches or more,
  so that the workers' start-up weighs little), after its first batch."""
  images = images * -(-8 * batch // len(images))
  ds = grain.MapDataset.source([{'image': image} for image in images]).seed(0)
  ds = input_pipeline.apply(ds.map_with_index(transforms.Decode('benchmark')),
                            input_pipeline.train_transforms(imagenet_data()))
  ds = ds.to_iter_dataset().batch(batch, drop_remainder=True)
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  iterator = iter(ds)
  next(iterator)  # start-up
  start, count = time.perf_counter(), 0
  for element in iterator:
    count += len(element['image'])
  return count / (time.perf_counter() - start)


def _limit_opencv_threads() -> str | None:
  try:
    import cv2  # noqa: PLC0415
  except ImportError as e:
    return f'OpenCV not importable ({e}): pip install -r benchmarks/requirements.txt'
  cv2.setNumThreads(1)  # one core, as the other decoders
  return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=48)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--workers', type=int, default=2, help='grain: 0 to this many workers')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--out', default=os.path.join('benchmarks', 'results',
                                                    'input_pipeline.json'))
  args = parser.parse_args()
  report = measure(args.images, args.repeats, range(args.workers + 1), args.batch)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=1)
  print(markdown(report))
  print(f'wrote {args.out}')


def measure(num_images: int, repeats: int, workers, batch: int) -> dict:
  """The report: every decoder x transform per core, grain with each of `workers`."""
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  images = jpegs(num_images)
  data = imagenet_data()
  pipelines = {'decode': [], 'train': input_pipeline.train_transforms(data),
               'eval': input_pipeline.eval_transforms(data)}
  decoders = dict(DECODERS)
  notes = []
  missing = _limit_opencv_threads()
  if missing:
    notes.append(missing)
    del decoders['OpenCV']
  load_before = os.getloadavg()
  table = {name: {**{what: per_core(decode, ops, images, repeats)
                     for what, ops in pipelines.items()},
                  'pixels_vs_pil': pixel_difference(decode, images)}
           for name, decode in decoders.items()}
  for name, row in table.items():
    row.update({f'{what}_vs_pil': row[what] / table['PIL'][what] for what in pipelines})
  cores = os.cpu_count()
  loaders = {}
  for count in workers:
    rate = grain_rate(images, count, batch)
    loaders[count] = {'images_per_s': rate,
                      'per_core': rate / (min(count, cores) if count else cores)}
  load_after = os.getloadavg()
  default = transforms.DEFAULT_DECODER
  train_per_core = table[default]['train']
  feed = {chip: {'images_per_s': TARGET_MFU * peak / VIT_L16_TRAIN_FLOPS,
                 'cores': TARGET_MFU * peak / VIT_L16_TRAIN_FLOPS / train_per_core}
          for chip, peak in CHIPS.items()}
  notes.append(f'1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, '
               f'on {cores} cores: the per-core rates are per CPU second of this process, '
               'grain\'s per wall second, which that load lowers')
  return {'images': num_images, 'repeats': repeats, 'cores': cores,
          'cpu': platform.processor(), 'pillow': PIL.__version__, 'default_decoder': default,
          'per_core': table, 'grain_train': loaders, 'feed_at_50pct_mfu': feed,
          'train_flops_per_image': VIT_L16_TRAIN_FLOPS, 'notes': notes}


def markdown(report: dict) -> str:
  lines = [f'{report["images"]} JPEGs of 500x375, one core, images/s (median of '
           f'{report["repeats"]} passes); x = over PIL', '',
           '| decoder | decode | train transform | eval transform | max / mean abs px diff '
           'to PIL |', '|---|---:|---:|---:|---:|']
  for name, row in report['per_core'].items():
    cells = ' | '.join(f'{row[w]:.1f} ({row[f"{w}_vs_pil"]:.2f}x)'
                       for w in ('decode', 'train', 'eval'))
    px = row['pixels_vs_pil']
    lines.append(f'| {name} | {cells} | {px["max_abs"]} / {px["mean_abs"]:.3f} |')
  lines += ['', f'grain, train pipeline ({report["default_decoder"]} decoder), '
            f'{report["cores"]} cores:', '', '| workers | images/s | per core |', '|---:|---:|---:|']
  lines += [f'| {w} | {r["images_per_s"]:.1f} | {r["per_core"]:.1f} |'
            for w, r in report['grain_train'].items()]
  lines += ['', f'To feed BEiT-L/16 fine-tuning ({report["train_flops_per_image"] / 1e9:.0f} '
            'GFLOPs an image) at 50% MFU, at the train transform\'s rate per core:', '']
  lines += [f'- {chip}: {f["images_per_s"]:.0f} images/s, {f["cores"]:.1f} cores'
            for chip, f in report['feed_at_50pct_mfu'].items()]
  lines += ['', *[f'note: {n}' for n in report['notes']]]
  return '\n'.join(lines)


if __name__ == '__main__':
  main()

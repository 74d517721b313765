"""What `python -m mood_jax.score` costs over the bare network, and where the rest goes.

    python -m benchmarks.detector_scoring [--images=1024] [--detector=DIR] [--repeats=5]

On a folder of generated PNGs (64x64 RGB, so the detector's channel and resize rule runs),
medians over `repeats` runs, each after a warm-up (compilation excluded):

  forward    the bare jitted forward pass (extraction.make_forward) on the decoded, resized,
             normalised batches, in the detector's batch size
  scored     Detector.score_prepared on the same decoded uint8 images: normalise, forward,
             every scorer, decisions (the overhead the issue bounds at 10%)
  decode     reading and preparing every PNG (Detector.read on the score CLI's thread pool)
  files      score.score_files on the paths: decode + scoring, as the CLI runs

Without --detector, one is made from configs/digits.py's model at init (weights do not
change the cost) with mahalanobis_mood fitted on its features of random images. Writes
benchmarks/results/detector_scoring.json.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import runpy
import tempfile
import time

import jax
import numpy as np
import PIL.Image

from mood_jax import detector as detector_lib, parallel, score as score_cli
from mood_jax.ood import detector_format, extraction, scorers
from mood_jax.stages import finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORER = 'mahalanobis_mood'


def synthetic_detector(out: str) -> str:
  """A detector of configs/digits.py's model at init, written to `out`."""
  config = runpy.run_path(os.path.join(REPO, 'configs', 'digits.py'))['get_config']('')
  model, init_params = finetune.classifier(config, drop_path=0.0)
  params, mesh = init_params(), parallel.make_mesh((('data', -1),))
  size = config.data.image_size
  images = np.random.default_rng(0).normal(size=(512, size, size, 1)).astype(np.float32)
  features, logits = (np.asarray(a) for a in extraction.make_forward(model, mesh)(params, images))
  scorer = scorers.get(SCORER)
  stats = scorers.fit(scorer, features, logits, np.zeros(len(features), np.int32), None)
  meta = detector_format.metadata(
      config, model='finetune', num_classes=logits.shape[-1], channels=1, scorers=[scorer],
      id_scores={SCORER: scorers.score(scorer, stats, features, logits)}, chosen_by='benchmark')
  detector_format.save(out, meta, params, {SCORER: stats}, replace=False)
  return out


def write_pngs(folder: str, count: int) -> list[str]:
  rng = np.random.default_rng(1)
  paths = []
  for i in range(count):
    path = os.path.join(folder, f'{i:05d}.png')
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def median_seconds(fns: dict, repeats: int) -> dict[str, float]:
  """{name: median seconds of fn()}, after a warm-up (compilation, caches); the functions
  run in turn in each repeat, so that a slow spell of a shared machine hits them alike."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', type=int, default=1024)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--detector', default=None, help='default: a synthetic digits one')
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results',
                                                    'detector_scoring.json'))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    directory = args.detector or synthetic_detector(os.path.join(scratch, 'detector'))
    detector = detector_lib.Detector.load(directory)
    paths = write_pngs(scratch, args.images)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      def decode():
        return np.stack(list(pool.map(detector.read, paths)))
      prepared = decode()
      seconds = median_seconds({'decode': decode}, args.repeats)
    forward, size = detector.forwards[detector.scorers[0].name], detector.batch_size
    batches = []
    for start in range(0, len(prepared), size):
      batch = np.zeros((size, *prepared.shape[1:]), np.uint8)
      batch[:len(prepared[start:start + size])] = prepared[start:start + size]
      batches.append(detector.normalize(batch))

    def bare_forward():
      outputs = [forward(detector.params, parallel.global_batch({'image': b}, detector.mesh)
                         ['image']) for b in batches]
      jax.block_until_ready(outputs)

    seconds.update(median_seconds({
        'forward': bare_forward,
        'scored': lambda: detector.score_prepared(prepared),
        'files': lambda: score_cli.score_files(detector, paths, log=print)}, args.repeats))
  rates = {name: args.images / s for name, s in seconds.items()}
  result = {
      'images': args.images, 'repeats': args.repeats, 'batch_size': detector.batch_size,
      'detector': args.detector or 'synthetic configs/digits.py model',
      'scorers': list(detector.meta['scorers']),
      'image_size': detector.image_size, 'source_images': '64x64 RGB PNG',
      'seconds_median': seconds, 'images_per_s': rates,
      'scored_over_forward': seconds['scored'] / seconds['forward'],
      'files_over_forward': seconds['files'] / seconds['forward'],
      # Where a file's time goes: decoding and resizing it, or scoring it.
      'decode_share': seconds['decode'] / (seconds['decode'] + seconds['scored']),
      'device': str(jax.devices()[0].device_kind), 'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'python': platform.python_version(),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()

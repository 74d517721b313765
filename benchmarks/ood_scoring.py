"""Exact knn and MOOD's Mahalanobis: ours against NumPy/scikit-learn and against faiss.

  python -m benchmarks.ood_scoring [--bank 50000 --queries 10000 --dim 768 --repeats 5
                                    --out FILE.json]

Random float32 features (a normal bank of ID-train rows and queries, with a shared offset as
real features have). Each method fits on the bank and scores the queries, end to end:

  knn/ours                 scorers.fit + scorers.score ('knn', k=50: exact, jitted)
  knn/sklearn              NearestNeighbors(algorithm='brute') on L2-normalised rows
  knn/numpy                L2-normalised rows, q @ bank.T in chunks + np.partition
  knn/faiss                faiss IndexFlatIP (exact inner product) on L2-normalised rows
  mahalanobis_mood/ours    scorers.fit + scorers.score ('mahalanobis_mood')
  mahalanobis_mood/numpy   MOOD's ood_utils: np.cov(bias=True), np.linalg.pinv (float64),
                           then sum((q - mu) * (P.dot((q - mu).T)).T)

Each method runs in a fresh subprocess: one untimed warm-up (our compilation), then
`repeats` timed runs; the parent reports medians and the ratio baseline / ours. Peak memory
is the subprocess's peak resident set (VmHWM; on CPU it includes XLA's buffers), and "own"
is that minus the peak just after the imports and data, before the first run. The
parent also checks that every method's scores agree with ours. faiss is optional
(benchmarks/requirements.txt): without it the faiss row is skipped with a note.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

K = 50
NUMPY_QUERY_CHUNK = 1024  # rows of q @ bank.T at a time: 200 MB of similarities


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ours(name):
  from mood_jax.ood import scorers  # noqa: PLC0415 (JAX only in the processes that time it)
  scorer = scorers.get(name)

  def run(bank, queries):
    stats = scorers.fit(scorer, bank, None, None, None)
    return scorers.score(scorer, stats, queries, None)
  return run


def _knn_sklearn(bank, queries):
  from sklearn.neighbors import NearestNeighbors  # noqa: PLC0415
  index = NearestNeighbors(n_neighbors=K, algorithm='brute').fit(_normalize(bank))
  distances, _ = index.kneighbors(_normalize(queries))
  return -distances[:, -1]**2


def _knn_numpy(bank, queries):
  bank, queries = _normalize(bank), _normalize(queries)
  kth = [np.partition(queries[i:i + NUMPY_QUERY_CHUNK] @ bank.T, -K, axis=1)[:, -K]
         for i in range(0, len(queries), NUMPY_QUERY_CHUNK)]
  return 2. * np.concatenate(kth) - 2.


def _knn_faiss(bank, queries):
  import faiss  # noqa: PLC0415
  index = faiss.IndexFlatIP(bank.shape[1])
  index.add(_normalize(bank))
  similarities, _ = index.search(_normalize(queries), K)
  return 2. * similarities[:, -1] - 2.


def _mahalanobis_numpy(bank, queries):
  bank, queries = _normalize(bank), _normalize(queries)
  precision = np.linalg.pinv(np.cov(bank.T, bias=True))
  centered = queries - np.mean(bank, axis=0, keepdims=True)
  return -np.sum(centered * (precision.dot(centered.T)).T, axis=-1)


METHODS = {
    'knn/ours': lambda: _ours('knn'),
    'knn/sklearn': lambda: _knn_sklearn,
    'knn/numpy': lambda: _knn_numpy,
    'knn/faiss': lambda: _knn_faiss,
    'mahalanobis_mood/ours': lambda: _ours('mahalanobis_mood'),
    'mahalanobis_mood/numpy': lambda: _mahalanobis_numpy,
}


def data(bank: int, queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  offset = rng.uniform(0, 2, dim).astype(np.float32)
  return (rng.standard_normal((bank, dim), dtype=np.float32) + offset,
          rng.standard_normal((queries, dim), dtype=np.float32) + offset)


def _peak_rss_mib():
  """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's
  peak over fork + exec into it, and the parent has imported JAX."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def time_run(run, bank, queries, repeats: int) -> tuple[dict, np.ndarray]:
  """({seconds of each timed run, their median}, the scores) of a method's
  `run(bank, queries)`: one untimed warm-up run (our compilation, caches), then `repeats`
  timed ones."""
  scores = np.asarray(run(bank, queries))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    scores = np.asarray(run(bank, queries))
    times.append(time.perf_counter() - start)
  return {'times_s': times, 'median_s': statistics.median(times)}, scores


def _child(args):
  """Times one method; prints its numbers as JSON and saves its scores."""
  run = METHODS[args.method]()
  bank, queries = data(args.bank, args.queries, args.dim)
  base_mib = _peak_rss_mib()
  result, scores = time_run(run, bank, queries, args.repeats)
  np.save(args.scores, scores)
  peak_mib = _peak_rss_mib()
  print(json.dumps({**result, 'peak_rss_mib': peak_mib, 'own_peak_rss_mib': peak_mib - base_mib}))


def _environment():
  import jax  # noqa: PLC0415
  import sklearn  # noqa: PLC0415
  versions = {'python': platform.python_version(), 'jax': jax.__version__,
              'numpy': np.__version__, 'scikit-learn': sklearn.__version__}
  try:
    import faiss  # noqa: PLC0415
    versions['faiss'] = faiss.__version__
  except ImportError:
    versions['faiss'] = None
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
               platform.processor())
  return {'device': f'{jax.devices()[0].device_kind} ({jax.default_backend()})', 'cpu': cpu,
          'cpu_count': os.cpu_count(), 'versions': versions}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--bank', type=int, default=50_000)
  parser.add_argument('--queries', type=int, default=10_000)
  parser.add_argument('--dim', type=int, default=768)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='ood_scoring.json')
  parser.add_argument('--method', choices=METHODS, help=argparse.SUPPRESS)  # child process
  parser.add_argument('--scores', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.method:
    return _child(args)

  environment = _environment()
  results, scores = {}, {}
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    for method in METHODS:
      if method == 'knn/faiss' and environment['versions']['faiss'] is None:
        print('knn/faiss: skipped, faiss is not importable (pip install -r '
              'benchmarks/requirements.txt)')
        continue
      path = os.path.join(tmp, method.replace('/', '_') + '.npy')
      command = [sys.executable, '-m', 'benchmarks.ood_scoring', '--method', method,
                 '--scores', path, '--bank', str(args.bank), '--queries', str(args.queries),
                 '--dim', str(args.dim), '--repeats', str(args.repeats)]
      child = subprocess.run(command, capture_output=True, text=True, check=True)
      results[method] = json.loads(child.stdout.strip().splitlines()[-1])
      scores[method] = np.load(path)
      print(f'{method:24s} median {results[method]["median_s"]:8.3f} s   peak '
            f'{results[method]["peak_rss_mib"]:7.0f} MiB (own {results[method]["own_peak_rss_mib"]:6.0f})',
            flush=True)
  for method, row in results.items():
    task, who = method.split('/')
    ours = results[f'{task}/ours']
    row['ratio_to_ours'] = row['median_s'] / ours['median_s']  # > 1: ours is faster
    row['max_abs_diff_to_ours'] = float(np.max(np.abs(scores[method] - scores[f'{task}/ours'])))
    if who != 'ours':
      print(f'{method:24s} {row["ratio_to_ours"]:5.2f}x the time of ours; scores within '
            f'{row["max_abs_diff_to_ours"]:.2e} of ours')
  report = {'config': {'bank': args.bank, 'queries': args.queries, 'dim': args.dim, 'k': K,
                       'repeats': args.repeats},
            'environment': {**environment, 'load_average_before': load_before,
                            'load_average_after': os.getloadavg()},
            'memory_method': 'peak RSS (VmHWM) of a fresh subprocess per method; own = '
                             'minus the peak after its imports and data',
            'results': results}
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()

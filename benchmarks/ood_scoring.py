"""Bank scorers at ImageNet scale: ours against NumPy and faiss, time and peak host memory.

  python -m benchmarks.ood_scoring [--bank 1280000 --queries 10000 --dim 1024 --classes 1000
                                    --repeats 3 --methods knn,nnguide --out FILE.json]

Random float32 features (a normal bank of ID-train rows and queries, with a shared offset as
real features have) and, for the head scorers, a random linear head. Each method fits on the
bank and scores the queries, end to end:

  knn/ours                 scorers.fit + scorers.score ('knn', k=50: exact, jitted, blocked)
  knn/numpy                L2-normalised rows, q @ bank.T in chunks + np.partition
  knn/faiss_ip             faiss IndexFlatIP (exact inner product) on L2-normalised rows
  knn/faiss_l2             faiss IndexFlatL2 (exact squared distance) on L2-normalised rows
  nnguide/ours             scorers 'nnguide', k=50, alpha=1 (the whole bank guides)
  nnguide/numpy            OpenOOD's nnguide_postprocessor.py in NumPy, chunked as knn/numpy
  nnguide/faiss_ip         OpenOOD's own: faiss IndexFlatIP on the guided bank
  mahalanobis_mood/ours    scorers 'mahalanobis_mood' (one-pass float64 Moments)
  mahalanobis_mood/numpy   MOOD's ood_utils formula (biased covariance, np.linalg.pinv) with
                           the covariance summed in float64 chunks: MOOD's own np.cov makes
                           an N x D float64 copy (10.5 GB at 1.28M x 1024), more than this
                           machine can spare
  vim/ours                 scorers 'vim' (principal dim 512 of 1024)
  vim/numpy                OpenOOD's vim_postprocessor.py formula in NumPy, float64
                           second moment summed in chunks as above

Each method runs in a fresh subprocess: one untimed warm-up on a slice (the first 2 x 4096
bank rows and 512 queries: our compilation of the chunk steps; the timed runs then compile
the full bank's shapes again, about a second), then `repeats` timed runs; the parent reports
medians and the ratio baseline / ours. Peak memory is the subprocess's peak resident set
(VmHWM; on CPU it includes XLA's buffers), and "own" is that minus the peak just after the
imports and data, before the first run. The parent checks that every method's scores agree
with ours, and refuses to start when the host has less memory available than a child needs.
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
from scipy import special

K = 50
NUMPY_QUERY_CHUNK = 256  # rows of q @ bank.T at a time: 1.3 GB of similarities at 1.28M
NUMPY_BANK_CHUNK = 65536  # rows of a float64 covariance sum at a time
WARMUP_BANK, WARMUP_QUERIES = 8192, 512


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ours(name, **hparams):
  from mood_jax.ood import scorers  # noqa: PLC0415 (JAX only in the processes that time it)
  scorer = scorers.get(name).with_hparams(**hparams)

  def run(d):
    stats = scorers.fit(scorer, d['bank'], d.get('bank_logits'), None, d.get('head'))
    return scorers.score(scorer, stats, d['queries'], d.get('query_logits'))
  return run


def _top_k_numpy(queries, bank, k=K):
  """[Q, k] largest inner products (unsorted), in query chunks."""
  return np.concatenate([np.partition(queries[i:i + NUMPY_QUERY_CHUNK] @ bank.T, -k,
                                      axis=1)[:, -k:]
                         for i in range(0, len(queries), NUMPY_QUERY_CHUNK)])


def _knn_numpy(d):
  return 2. * _top_k_numpy(_normalize(d['queries']), _normalize(d['bank'])).min(-1) - 2.


def _added_in_chunks(index, bank, prepare):
  """faiss keeps its own copy of the rows: added a chunk at a time, the host holds the data
  and that copy, not a third, prepared one."""
  for i in range(0, len(bank), NUMPY_BANK_CHUNK):
    index.add(prepare(bank[i:i + NUMPY_BANK_CHUNK]))
  return index


def _knn_faiss(metric):
  def run(d):
    import faiss  # noqa: PLC0415
    index = (faiss.IndexFlatIP if metric == 'ip' else faiss.IndexFlatL2)(d['bank'].shape[1])
    found, _ = _added_in_chunks(index, d['bank'], _normalize).search(_normalize(d['queries']),
                                                                      K)
    return 2. * found[:, -1] - 2. if metric == 'ip' else -found[:, -1]
  return run


def _guided(bank, bank_logits):
  return (_normalize(bank) * special.logsumexp(bank_logits, axis=-1)[:, None]).astype(np.float32)


def _nnguide_numpy(d):
  top = _top_k_numpy(_normalize(d['queries']), _guided(d['bank'], d['bank_logits']))
  return top.mean(-1) * special.logsumexp(d['query_logits'], axis=-1)


def _nnguide_faiss(d):
  import faiss  # noqa: PLC0415
  index = faiss.IndexFlatIP(d['bank'].shape[1])
  for i in range(0, len(d['bank']), NUMPY_BANK_CHUNK):
    index.add(_guided(d['bank'][i:i + NUMPY_BANK_CHUNK], d['bank_logits'][i:i + NUMPY_BANK_CHUNK]))
  found, _ = index.search(_normalize(d['queries']), K)
  return found.mean(-1) * special.logsumexp(d['query_logits'], axis=-1)


def _chunked_second_moment(rows, center, prepare=lambda x: x):
  total = np.zeros((rows.shape[1],) * 2)
  for i in range(0, len(rows), NUMPY_BANK_CHUNK):
    centered = np.float64(prepare(rows[i:i + NUMPY_BANK_CHUNK])) - center
    total += centered.T @ centered
  return total / len(rows)


def _chunked_mean(rows, prepare=lambda x: x):
  return sum(np.float64(prepare(rows[i:i + NUMPY_BANK_CHUNK])).sum(0)
             for i in range(0, len(rows), NUMPY_BANK_CHUNK)) / len(rows)


def _mahalanobis_numpy(d):
  mean = _chunked_mean(d['bank'], _normalize)
  precision = np.linalg.pinv(_chunked_second_moment(d['bank'], mean, _normalize))
  centered = np.float64(_normalize(d['queries'])) - mean
  return -np.sum(centered * (precision.dot(centered.T)).T, axis=-1)


def _vim_numpy(d):
  """vim_postprocessor.py: u = -pinv(W) b, eigenvectors of the second moment about u beyond
  the top D, alpha = mean max logit / mean residual norm on the bank; energy - alpha r."""
  kernel, bias = np.float64(d['head']['kernel']), np.float64(d['head']['bias'])
  origin = -np.linalg.pinv(kernel.T) @ bias
  eigenvalues, eigenvectors = np.linalg.eigh(_chunked_second_moment(d['bank'], origin))
  dim = d['bank'].shape[1]
  principal = 1000 if dim >= 2048 else 512 if dim >= 768 else dim // 2  # ViM's rule
  null_space = eigenvectors[:, np.argsort(-eigenvalues)[principal:]]
  def residual(x):
    return np.concatenate([np.linalg.norm((np.float64(x[i:i + NUMPY_BANK_CHUNK]) - origin)
                                          @ null_space, axis=-1)
                           for i in range(0, len(x), NUMPY_BANK_CHUNK)])
  alpha = d['bank_logits'].max(-1).mean() / residual(d['bank']).mean()
  return special.logsumexp(d['query_logits'], -1) - alpha * residual(d['queries'])


METHODS = {
    'knn/ours': lambda: _ours('knn'),
    'knn/numpy': lambda: _knn_numpy,
    'knn/faiss_ip': lambda: _knn_faiss('ip'),
    'knn/faiss_l2': lambda: _knn_faiss('l2'),
    'nnguide/ours': lambda: _ours('nnguide', k=K, alpha=1.),
    'nnguide/numpy': lambda: _nnguide_numpy,
    'nnguide/faiss_ip': lambda: _nnguide_faiss,
    'mahalanobis_mood/ours': lambda: _ours('mahalanobis_mood'),
    'mahalanobis_mood/numpy': lambda: _mahalanobis_numpy,
    'vim/ours': lambda: _ours('vim', dim=None),
    'vim/numpy': lambda: _vim_numpy,
}
NEEDS_HEAD = ('nnguide', 'vim')


def data(bank: int, queries: int, dim: int, classes: int, with_head: bool) -> dict:
  rng = np.random.default_rng(0)
  offset = rng.uniform(0, 2, dim).astype(np.float32)
  out = {'bank': rng.standard_normal((bank, dim), dtype=np.float32),
         'queries': rng.standard_normal((queries, dim), dtype=np.float32)}
  out['bank'] += offset
  out['queries'] += offset
  if with_head:
    out['head'] = {'kernel': rng.normal(0, dim**-0.5, (dim, classes)).astype(np.float32),
                   'bias': rng.normal(0, 0.1, classes).astype(np.float32)}
    for name in ('bank', 'queries'):
      out[name + '_logits' if name == 'bank' else 'query_logits'] = (
          out[name] @ out['head']['kernel'] + out['head']['bias'])
  return out


def _needed_gib(args, method) -> float:
  """A child's rough peak: the data, the logits, and the method's own copy of the bank."""
  bank_gib = args.bank * args.dim * 4 / 2**30
  logits_gib = args.bank * args.classes * 4 / 2**30 if method.split('/')[0] in NEEDS_HEAD else 0
  return 2. * bank_gib + logits_gib + 1.5


def _peak_rss_mib():
  """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's
  peak over fork + exec into it, and the parent has imported JAX."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def time_run(run, d, repeats: int) -> tuple[dict, np.ndarray]:
  """({seconds of each timed run, their median}, the scores) of a method's `run(data)`: one
  untimed warm-up on a slice of the data (our compilation), then `repeats` timed runs."""
  warm = {**d, 'bank': d['bank'][:WARMUP_BANK], 'queries': d['queries'][:WARMUP_QUERIES]}
  for name, length in (('bank_logits', WARMUP_BANK), ('query_logits', WARMUP_QUERIES)):
    if name in d:
      warm[name] = d[name][:length]
  np.asarray(run(warm))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    scores = np.asarray(run(d))
    times.append(time.perf_counter() - start)
  return {'times_s': times, 'median_s': statistics.median(times)}, scores


def _child(args):
  """Times one method; prints its numbers as JSON and saves its scores."""
  run = METHODS[args.method]()
  d = data(args.bank, args.queries, args.dim, args.classes,
           args.method.split('/')[0] in NEEDS_HEAD)
  base_mib = _peak_rss_mib()
  result, scores = time_run(run, d, args.repeats)
  np.save(args.scores, scores)
  peak_mib = _peak_rss_mib()
  print(json.dumps({**result, 'peak_rss_mib': peak_mib, 'own_peak_rss_mib': peak_mib - base_mib,
                    'bank_mib': d['bank'].nbytes / 2**20}))


def _available_gib() -> float:
  with open('/proc/meminfo') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('MemAvailable')) / 2**20


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


def _table(report) -> str:
  lines = ['| method | median s | peak RSS MiB | own peak / bank | ours / this time | '
           'max abs diff to ours |', '| --- | --- | --- | --- | --- | --- |']
  for method, row in report['results'].items():
    lines.append(f'| {method} | {row["median_s"]:.2f} | {row["peak_rss_mib"]:.0f} | '
                 f'{row["own_peak_rss_mib"] / row["bank_mib"]:.2f} | '
                 f'{1 / row["ratio_to_ours"]:.2f} | {row["max_abs_diff_to_ours"]:.1e} |')
  config = report['config']
  return (f'Bank {config["bank"]:,} x {config["dim"]} float32, {config["queries"]:,} queries, '
          f'k={config["k"]}, {config["classes"]} classes; medians of {config["repeats"]} '
          f'runs; "ours / this time" > 1: ours is slower.\n\n' + '\n'.join(lines) + '\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--bank', type=int, default=1_280_000)
  parser.add_argument('--queries', type=int, default=10_000)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--classes', type=int, default=1000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--methods', default='knn,nnguide,mahalanobis_mood,vim',
                      help='scorers to time, comma-separated')
  parser.add_argument('--out', default='benchmarks/results/ood_scoring.json')
  parser.add_argument('--method', choices=METHODS, help=argparse.SUPPRESS)  # child process
  parser.add_argument('--scores', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.method:
    return _child(args)

  tasks = args.methods.split(',')
  unknown = sorted(set(tasks) - {m.split('/')[0] for m in METHODS})
  if unknown:
    sys.exit(f'error: --methods names {unknown}; choose from knn, nnguide, mahalanobis_mood, vim')
  environment = _environment()
  results, scores = {}, {}
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    for method in (m for m in METHODS if m.split('/')[0] in tasks):
      if 'faiss' in method and environment['versions']['faiss'] is None:
        print(f'{method}: skipped, faiss is not importable (pip install -r '
              'benchmarks/requirements.txt)')
        continue
      if _available_gib() < _needed_gib(args, method):
        sys.exit(f'error: {method} needs about {_needed_gib(args, method):.1f} GiB and the host '
                 f'has {_available_gib():.1f} GiB available: use a smaller --bank, or wait')
      path = os.path.join(tmp, method.replace('/', '_') + '.npy')
      command = [sys.executable, '-m', 'benchmarks.ood_scoring', '--method', method,
                 '--scores', path, '--bank', str(args.bank), '--queries', str(args.queries),
                 '--dim', str(args.dim), '--classes', str(args.classes),
                 '--repeats', str(args.repeats)]
      child = subprocess.run(command, capture_output=True, text=True)
      if child.returncode:
        why = (child.stderr.strip().splitlines() or [f'exit status {child.returncode} and no '
                                                     'message (killed: out of memory?)'])[-1]
        sys.exit(f'error: {method} failed: {why}')
      results[method] = json.loads(child.stdout.strip().splitlines()[-1])
      scores[method] = np.load(path)
      row = results[method]
      print(f'{method:24s} median {row["median_s"]:8.2f} s   peak {row["peak_rss_mib"]:7.0f} '
            f'MiB (own {row["own_peak_rss_mib"]:6.0f})', flush=True)
  for method, row in results.items():
    task, who = method.split('/')
    ours = results[f'{task}/ours']
    row['ratio_to_ours'] = row['median_s'] / ours['median_s']  # > 1: ours is faster
    row['max_abs_diff_to_ours'] = float(np.max(np.abs(scores[method] - scores[f'{task}/ours'])))
  report = {'config': {'bank': args.bank, 'queries': args.queries, 'dim': args.dim, 'k': K,
                       'classes': args.classes, 'repeats': args.repeats},
            'environment': {**environment, 'load_average_before': load_before,
                            'load_average_after': os.getloadavg()},
            'memory_method': 'peak RSS (VmHWM) of a fresh subprocess per method; own = '
                             'minus the peak after its imports and data',
            'results': results}
  report['table'] = _table(report)
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
    f.write(report['table'])
  print(report['table'])
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()

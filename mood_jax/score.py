"""Scores image files with a trained detector.

    python -m mood_jax.score --detector=WORKDIR/detector --out=scores.csv PATH [PATH ...]

PATH is an image file, a folder (searched recursively), a glob (quoted: 'shots/*.jpg') or a
text file with one image path a line (relative to its folder). FILE is CSV, or JSON Lines for
a .jsonl name: one row per image with its path, each scorer's score (higher = more
in-distribution) and, per threshold, `ood_<scorer>_tpr95` true when the score is below it.
Images of another size or channel count go through the detector's own rule (printed).
Unreadable files are listed with the reason and skipped; the exit status is non-zero only
when no image could be scored.
"""

import concurrent.futures
import csv
import glob
import io
import json
import os
import sys
import time

import numpy as np
import PIL.Image

from mood_jax import command_line
from mood_jax.data import folder
from mood_jax.detector import Detector
from mood_jax.errors import UserError

# Images decoded ahead per step, in batches of the detector: bounds host memory on any input.
_BATCHES_PER_STEP = 4
_PROGRESS_EVERY_S = 5.0


def expand(paths: list[str]) -> tuple[list[str], dict[str, str]]:
  """(image files in order, each once; {argument: why} for arguments that name nothing)."""
  files, missing = [], {}
  for path in paths:
    if os.path.isfile(path) and not path.lower().endswith(folder.IMAGE_SUFFIXES):
      files.extend(folder.list_files(path))  # a list of paths
      continue
    matches = [path] if os.path.exists(path) else sorted(glob.glob(path, recursive=True))
    if not matches:
      missing[path] = 'no such file or folder, and no file matches it as a glob'
    for match in matches:
      files.extend(folder.list_files(match) if os.path.isdir(match) else [match])
  return list(dict.fromkeys(files)), missing


def _read(detector: Detector, path: str):
  """(the network's uint8 input, None) or (None, why it is unreadable)."""
  try:
    return detector.read(path), None
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    return None, str(e) or type(e).__name__


def score_files(detector: Detector, files: list[str], *, log=print):
  """(rows, {path: why} for the files that do not decode): every file once, in order.

  Files are decoded on a thread pool (PIL releases the GIL while decoding), the next few
  batches while the network scores these.
  """
  rows, unreadable = [], {}
  step = _BATCHES_PER_STEP * detector.batch_size
  chunks = [files[first:first + step] for first in range(0, len(files), step)]
  start = last_report = time.perf_counter()
  done = 0
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    def decode(names):
      return [pool.submit(_read, detector, path) for path in names]
    pending = decode(chunks[0]) if chunks else []
    for k, names in enumerate(chunks):
      decoded = [future.result() for future in pending]
      pending = decode(chunks[k + 1]) if k + 1 < len(chunks) else []
      unreadable.update({path: why for path, (_, why) in zip(names, decoded) if why})
      good = [(path, image) for path, (image, _) in zip(names, decoded) if image is not None]
      if good:
        result = detector.score_prepared(np.stack([image for _, image in good]))
        for i, (path, _) in enumerate(good):
          rows.append({'path': path,
                       **{name: float(s[i]) for name, s in result.scores.items()},
                       **{name: bool(d[i]) for name, d in result.ood.items()}})
      done, now = done + len(names), time.perf_counter()
      if now - last_report > _PROGRESS_EVERY_S and done < len(files):
        rate = done / (now - start)
        log(f'{done}/{len(files)} images, {rate:.1f} images/s, ETA '
            f'{(len(files) - done) / rate:.0f} s')
        last_report = now
  return rows, unreadable


def _text(rows: list[dict], jsonl: bool) -> str:
  if jsonl:
    return ''.join(json.dumps(row) + '\n' for row in rows)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows({k: str(v).lower() if isinstance(v, bool) else v for k, v in row.items()}
                   for row in rows)
  return buffer.getvalue()


def write_rows(path: str, rows: list[dict]) -> None:
  """CSV, or JSON Lines for a .jsonl path; written beside it and moved into place."""
  staging = f'{path}.partial'
  with open(staging, 'w') as f:
    f.write(_text(rows, path.lower().endswith('.jsonl')))
  os.replace(staging, path)


def summary(rows: list[dict], decision_columns: list[str]) -> list[str]:
  return [f'  {column}: {sum(row[column] for row in rows)} of {len(rows)} flagged OOD'
          for column in decision_columns]


def run(detector_dir: str, out: str, paths: list[str]) -> None:
  files, missing = expand(paths)
  for path, why in missing.items():
    print(f'skipped: {path}: {why}', file=sys.stderr)
  if not files:
    raise UserError(f'no image files in {paths}: pass image files, folders, globs or a text '
                    'file of paths')
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    raise UserError(f'--out={out}: folder {out_dir} does not exist; create it first')
  detector = Detector.load(detector_dir)
  print(f'{len(files)} files; images: {detector.meta["preprocessing"]["rule"]}',
        file=sys.stderr)
  start = time.perf_counter()
  rows, unreadable = score_files(detector, files,
                                 log=lambda line: print(line, file=sys.stderr))
  for path, why in unreadable.items():
    print(f'unreadable: {path}: {why}', file=sys.stderr)
  if not rows:
    raise UserError(f'none of the {len(files)} files could be read as an image (listed '
                    'above); nothing written')
  write_rows(out, rows)
  print(f'scored {len(rows)} images in {time.perf_counter() - start:.1f} s '
        f'({len(unreadable)} unreadable, skipped) into {out}')
  print('\n'.join(summary(rows, detector.decision_columns)))


def main(argv=None) -> None:
  parser = command_line.parser('mood_jax.score', __doc__)
  parser.add_argument('--detector', required=True,
                      help='WORKDIR/detector, or the --out of python -m mood_jax.export')
  parser.add_argument('--out', required=True, help='results: .csv, or .jsonl for JSON Lines')
  parser.add_argument('paths', nargs='+', metavar='PATH',
                      help='image files, folders, globs, or text files of paths')
  args = parser.parse_args(argv)
  try:
    run(args.detector, args.out, args.paths)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()

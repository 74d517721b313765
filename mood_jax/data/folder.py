"""Image folders and file lists -> an ArrayRecord TFDS dataset, once, without TensorFlow.

    python -m mood_jax.data.folder --name=inaturalist --source=DIR_OR_LIST \
        [--data_dir=~/tensorflow_datasets]

makes the OOD set `folder:inaturalist` (for --config.data.ood_sets). SOURCE is a folder (searched
recursively for image files) or a text file with one image path a line (relative to the file's
folder). Files are stored as their own encoded bytes, in one split 'test', label -1; each is
decoded once first, and the ones that fail are reported by name and left out. A dataset that is
already built is never rebuilt or overwritten.
"""

import argparse
import dataclasses
import os
import sys
import time

from absl import logging
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

PREFIX = 'folder:'
SPLIT = 'test'
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


@dataclasses.dataclass(eq=False, kw_only=True)
class FolderConfig(tfds.core.BuilderConfig):
  """`name` is the dataset's name; `files` are only needed to build it, not to read it."""
  files: tuple[str, ...] = ()


class MoodFolder(tfds.core.GeneratorBasedBuilder):
  """Images from a folder or a file list, as their original encoded bytes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = None  # as embedded._Bundled: no checksums to look up

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.Scalar(np.int64)})
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    for i, path in enumerate(self.builder_config.files):
      with open(path, 'rb') as f:
        yield i, {'image': f.read(), 'label': -1}


def builder(name: str, data_dir: str, files: tuple[str, ...] = ()) -> MoodFolder:
  return MoodFolder(config=FolderConfig(name=name, files=files), data_dir=data_dir,
                    file_format='array_record')


def prepare_command(name: str, data_dir: str) -> str:
  return f'python -m mood_jax.data.folder --name={name} --source=DIR_OR_LIST --data_dir={data_dir}'


def list_files(source: str) -> list[str]:
  """The image files of a folder (recursively, sorted), or the paths listed in a text file."""
  if os.path.isdir(source):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(source)
                  for name in names if name.lower().endswith(IMAGE_SUFFIXES))
  if os.path.isfile(source):
    base = os.path.dirname(os.path.abspath(source))
    with open(source) as f:
      return [os.path.join(base, line.strip()) for line in f if line.strip()]
  raise ValueError(f'--source={source!r} is neither a folder nor a file list')


def unreadable(paths) -> dict[str, str]:
  """path -> why, for every file that does not open and fully decode; goes on past failures."""
  bad = {}
  for path in paths:
    try:
      with PIL.Image.open(path) as image:
        image.load()  # a truncated file fails here, not at open
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
      bad[path] = str(e) or type(e).__name__
  return bad


def build(name: str, source: str, data_dir: str) -> tuple[int, dict[str, str]]:
  """Builds `folder:name`; returns the number of images stored and the unreadable files."""
  data_dir = os.path.expanduser(data_dir)
  if not name or not name.replace('_', '').replace('-', '').isalnum():
    raise ValueError(f'--name={name!r}: use letters, digits, _ and - only')
  if builder(name, data_dir).is_prepared():
    raise ValueError(f'{PREFIX}{name} already exists in {data_dir}: choose another --name '
                     '(datasets are never overwritten)')
  paths = list_files(source)
  bad = unreadable(paths)
  good = tuple(p for p in paths if p not in bad)
  if not good:
    raise ValueError(f'no readable images in {source!r} ({len(bad)} unreadable)')
  start = time.perf_counter()
  builder(name, data_dir, good).download_and_prepare()
  logging.info('Built %s%s (%d images) in %s (%.1f s)', PREFIX, name, len(good), data_dir,
               time.perf_counter() - start)
  return len(good), bad


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m mood_jax.data.folder', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--name', required=True, help='the OOD set becomes folder:NAME')
  parser.add_argument('--source', required=True, help='image folder, or text file of paths')
  parser.add_argument('--data_dir', default='~/tensorflow_datasets',
                      help="TFDS data dir: the config's data.data_dir")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    count, bad = build(args.name, args.source, args.data_dir)
  except ValueError as e:
    sys.exit(f'error: {e}')
  for path, why in bad.items():
    print(f'unreadable: {path}: {why}')
  print(f'{PREFIX}{args.name}: {count} images stored, {len(bad)} unreadable files left out')


if __name__ == '__main__':
  main()

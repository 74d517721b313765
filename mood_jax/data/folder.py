"""Image folders and file lists -> an ArrayRecord TFDS dataset, once, without TensorFlow.

    python -m mood_jax.data.folder --name=inaturalist --source=DIR_OR_LIST \
        [--data_dir=~/tensorflow_datasets] [--labelled [--test_fraction=0.2]]

makes `folder:inaturalist`. Unlabelled (an OOD set, for --config.data.ood_sets): SOURCE is a
folder (searched recursively for image files) or a text file with one image path a line
(relative to the file's folder), stored in one split 'test', label -1. `--labelled` (ID data,
for --config.data.name): SOURCE is a folder of class subfolders, or a text file of
`PATH CLASS` lines; each class is split into 'train' and 'test' by a seeded draw of
`test_fraction` of its images. Files are stored as their own encoded bytes, in the order
listed, and the dataset's metadata keeps the class names and each split's file names (an
example's id in scores.npz). Each file is decoded once first; the ones that fail are reported
by name and left out. A dataset that is already built is never rebuilt or overwritten.
"""

import dataclasses
import os
import sys
import time

from absl import logging
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from mood_jax import command_line

PREFIX = 'folder:'
SPLIT = 'test'  # the unlabelled sets' one split, and the labelled ones' test split
TRAIN_SPLIT = 'train'
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


@dataclasses.dataclass(eq=False, kw_only=True)
class FolderConfig(tfds.core.BuilderConfig):
  """`name` is the dataset's name; the rest is only needed to build it, not to read it:
  {split: ((path, label), ...)}, the class names, and the folder file names are relative to."""
  splits: dict = dataclasses.field(default_factory=dict)
  class_names: tuple[str, ...] = ()
  root: str = ''


class MoodFolder(tfds.core.GeneratorBasedBuilder):
  """Images from a folder or a file list, as their original encoded bytes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = None  # as embedded._Bundled: no checksums to look up

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.Scalar(np.int64)})  # a class index, or -1 (unlabelled)
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features,
                                 metadata=tfds.core.MetadataDict(),
                                 # Records in the order listed: file_names()[i] is record i.
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    config = self.builder_config
    self.info.metadata.update(class_names=list(config.class_names), files={
        split: [os.path.relpath(path, config.root) for path, _ in examples]
        for split, examples in config.splits.items()})
    return {split: self._generate_examples(examples)
            for split, examples in config.splits.items()}

  def _generate_examples(self, examples):
    for i, (path, label) in enumerate(examples):
      with open(path, 'rb') as f:
        yield i, {'image': f.read(), 'label': label}


def builder(name: str, data_dir: str, files: tuple[str, ...] = (), **config) -> MoodFolder:
  """The builder of `folder:name`; to build it, `files` (an unlabelled set: split 'test',
  label -1, names relative to their common folder) or FolderConfig's fields."""
  if files:
    config = dict(config, splits={SPLIT: tuple((path, -1) for path in files)},
                  root=os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files]))
  return MoodFolder(config=FolderConfig(name=name, **config), data_dir=data_dir,
                    file_format='array_record')


def prepare_command(name: str, data_dir: str, labelled: bool = False) -> str:
  return (f'python -m mood_jax.data.folder --name={name} --source=DIR_OR_LIST '
          f'--data_dir={data_dir}' + (' --labelled' if labelled else ''))


def _prepared(name: str, data_dir: str, labelled: bool) -> MoodFolder:
  found = builder(name, data_dir)
  if not found.is_prepared():
    raise ValueError(f'{PREFIX}{name} is not prepared in {data_dir}: run '
                     f'{prepare_command(name, data_dir, labelled)}')
  return found


def class_names(name: str, data_dir: str) -> list[str]:
  """The classes of the labelled dataset `folder:name`, as built."""
  names = _prepared(name, data_dir, labelled=True).info.metadata.get('class_names')
  if not names:
    raise ValueError(f'{PREFIX}{name} in {data_dir} has no class labels (an OOD set): build '
                     f'ID data with {prepare_command("NEW_NAME", data_dir, labelled=True)}')
  return names


def file_names(name: str, data_dir: str, split: str) -> list[str] | None:
  """Each record's file name, relative to the source folder; None for a dataset built before
  they were kept."""
  files = _prepared(name, data_dir, labelled=False).info.metadata.get('files')
  return files[split] if files else None


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


def list_labelled(source: str) -> tuple[list[tuple[str, str]], str]:
  """([(path, class name)], root): a folder's class subfolders (each searched recursively),
  or a text file of `PATH CLASS` lines (paths relative to the file's folder)."""
  if os.path.isdir(source):
    classes = sorted(entry.name for entry in os.scandir(source) if entry.is_dir())
    if not classes:
      raise ValueError(f'--source={source!r} has no class subfolders (--labelled)')
    return [(path, name) for name in classes
            for path in list_files(os.path.join(source, name))], source
  if os.path.isfile(source):
    base = os.path.dirname(os.path.abspath(source))
    with open(source) as f:
      lines = [line.strip().rsplit(None, 1) for line in f if line.strip()]
    if any(len(parts) != 2 for parts in lines):
      raise ValueError(f'--source={source!r}: with --labelled, each line is PATH CLASS')
    return [(os.path.join(base, path), label) for path, label in lines], base
  raise ValueError(f'--source={source!r} is neither a folder nor a file list')


def split_per_class(labels: list[int], test_fraction: float, seed: int = 0) -> np.ndarray:
  """A bool per example, True for test: `test_fraction` of each class (at least one image
  when the class has two or more), drawn with `seed`."""
  rng = np.random.default_rng(seed)
  is_test = np.zeros(len(labels), bool)
  labels = np.asarray(labels)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = int(round(test_fraction * len(members)))
    count = min(max(count, 1 if len(members) > 1 and test_fraction > 0 else 0), len(members) - 1)
    is_test[rng.choice(members, count, replace=False)] = True
  return is_test


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


def build(name: str, source: str, data_dir: str, *, labelled: bool = False,
          test_fraction: float = 0.2) -> tuple[int, dict[str, str]]:
  """Builds `folder:name`; returns the number of images stored and the unreadable files."""
  data_dir = os.path.expanduser(data_dir)
  if not name or not name.replace('_', '').replace('-', '').isalnum():
    raise ValueError(f'--name={name!r}: use letters, digits, _ and - only')
  if builder(name, data_dir).is_prepared():
    raise ValueError(f'{PREFIX}{name} already exists in {data_dir}: choose another --name '
                     '(datasets are never overwritten)')
  if labelled and not 0 < test_fraction < 1:
    raise ValueError(f'--test_fraction={test_fraction} must be inside (0, 1)')
  listed, root = (list_labelled(source) if labelled else
                  ([(path, None) for path in list_files(source)], None))
  bad = unreadable(path for path, _ in listed)
  good = [(path, label) for path, label in listed if path not in bad]
  if not good:
    raise ValueError(f'no readable images in {source!r} ({len(bad)} unreadable)')
  classes = sorted({label for _, label in good}) if labelled else []
  if labelled:
    indexed = [(path, classes.index(label)) for path, label in good]
    is_test = split_per_class([label for _, label in indexed], test_fraction)
    made = builder(name, data_dir, class_names=tuple(classes), root=os.path.abspath(root),
                   splits={TRAIN_SPLIT: tuple(e for e, t in zip(indexed, is_test) if not t),
                           SPLIT: tuple(e for e, t in zip(indexed, is_test) if t)})
  else:
    made = builder(name, data_dir, tuple(path for path, _ in good))
  start = time.perf_counter()
  made.download_and_prepare()
  logging.info('Built %s%s (%d images%s) in %s (%.1f s)', PREFIX, name, len(good),
               f', {len(classes)} classes' if classes else '', data_dir,
               time.perf_counter() - start)
  return len(good), bad


def main(argv=None) -> None:
  parser = command_line.parser('mood_jax.data.folder', __doc__)
  parser.add_argument('--name', required=True, help='the dataset becomes folder:NAME')
  parser.add_argument('--source', required=True, help='image folder, or text file of paths')
  parser.add_argument('--data_dir', default='~/tensorflow_datasets',
                      help="TFDS data dir: the config's data.data_dir")
  parser.add_argument('--labelled', action='store_true',
                      help='ID data: class subfolders, or PATH CLASS lines')
  parser.add_argument('--test_fraction', type=float, default=0.2,
                      help='--labelled: the share of each class kept for the test split')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    count, bad = build(args.name, args.source, args.data_dir, labelled=args.labelled,
                       test_fraction=args.test_fraction)
  except ValueError as e:
    sys.exit(f'error: {e}')
  for path, why in bad.items():
    print(f'unreadable: {path}: {why}')
  print(f'{PREFIX}{args.name}: {count} images stored, {len(bad)} unreadable files left out')


if __name__ == '__main__':
  main()

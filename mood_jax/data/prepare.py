"""Prepares a real dataset as ArrayRecord from its official files, without TensorFlow.

    python -m mood_jax.data.prepare NAME [--data_dir=~/tensorflow_datasets] [--manual_dir=DIR]

NAME is a TFDS name the configs read (cifar10, cifar100, svhn_cropped, dtd, places365_small,
imagenet2012, food101, oxford_flowers102, stanford_dogs, oxford_iiit_pet, fashion_mnist, mnist)
or an OpenOOD v1.5 list ('openood:cifar10/test_tin', see `openood`). The official files are
looked for in --manual_dir (default DATA_DIR/downloads/manual), then where a system package
installs them (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist), and, where
they are public, downloaded into --manual_dir when absent. TFDS's own builders for these
datasets need TensorFlow to read their files or encode their images, so this reads the
archives itself (`archives`) and writes them through the same TFDS builder, whose dataset
`tfds.data_source` then reads.

TFDS writes into a temporary folder and renames it when complete, so an interrupted
preparation leaves nothing a run would read; the next one removes the leftover and starts
over. One preparation of a dataset runs at a time (`build_lock`): a second waits, then finds
it prepared. A prepared dataset is never overwritten.
"""

import argparse
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

from absl import logging
import tensorflow_datasets as tfds

from mood_jax import command_line
from mood_jax.data import archives, build_lock, folder
from mood_jax.data.sources import openood
from mood_jax.errors import UserError

DEFAULT_DATA_DIR = '~/tensorflow_datasets'
_DOWNLOAD_TIMEOUT_S = 30

# (file name, where it is published: a URL to download it from, or how to get it[, its md5
# where the publisher gives one: the CIFAR page does]).
_CIFAR10 = ('cifar-10-python.tar.gz', 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
            'c58f30108f718f92721af3b95e74349a')
_CIFAR100 = ('cifar-100-python.tar.gz', 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
             'eb9058c3a382ffc7106e4002c42a8d85')
_SVHN = 'http://ufldl.stanford.edu/housenumbers/'
_DTD = ('dtd-r1.0.1.tar.gz', 'https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz')
_PLACES = 'http://data.csail.mit.edu/places/places365/'
_IMAGENET = 'image-net.org/download-images, after registering'
_FOOD101 = ('food-101.tar.gz', 'http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz')
_FLOWERS = 'https://www.robots.ox.ac.uk/~vgg/data/flowers/102/'
_DOGS = 'http://vision.stanford.edu/aditya86/ImageNetDogs/'
_PETS = 'https://www.robots.ox.ac.uk/~vgg/data/pets/data/'
# Where TFDS's mnist.py downloads them: Zalando's published location, and MNIST's mirror.
_FASHION_MNIST = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
_MNIST = 'https://storage.googleapis.com/cvdf-datasets/mnist/'
# Folders where a system package puts a dataset's official files, searched after --manual_dir.
INSTALLED = {'fashion_mnist': ('/usr/share/datasets/fashion-mnist',)}

Fetch = Callable[..., str]  # (file name, where published[, md5]) -> local path
Splits = dict[str, Iterator[archives.Example]]


def _cifar(fetch: Fetch, archive: tuple[str, str, str], top: str, train: tuple[str, ...],
           test: str, label_keys: dict[str, str]) -> Splits:
  path = fetch(*archive)
  return {'train': archives.cifar(path, tuple(f'{top}/{b}' for b in train), label_keys, 'train_'),
          'test': archives.cifar(path, (f'{top}/{test}',), label_keys, 'test_')}


def _cifar10(fetch: Fetch) -> Splits:
  batches = tuple(f'data_batch_{i}' for i in range(1, 6))
  return _cifar(fetch, _CIFAR10, 'cifar-10-batches-py', batches, 'test_batch', {'label': 'labels'})


def _cifar100(fetch: Fetch) -> Splits:
  return _cifar(fetch, _CIFAR100, 'cifar-100-python', ('train',), 'test',
                {'label': 'fine_labels', 'coarse_label': 'coarse_labels'})


def _svhn(fetch: Fetch) -> Splits:
  # Not 'extra' (531k more training digits, 1.3 GB): no config reads it.
  return {split: archives.svhn(fetch(f'{split}_32x32.mat', _SVHN + f'{split}_32x32.mat'),
                               f'{split}_') for split in ('train', 'test')}


def _dtd(fetch: Fetch) -> Splits:
  path = fetch(*_DTD)
  # TFDS's dtd: the first of DTD's ten train/val/test partitions.
  return {'train': archives.dtd(path, 'train1'), 'validation': archives.dtd(path, 'val1'),
          'test': archives.dtd(path, 'test1')}


def _places365(fetch: Fetch) -> Splits:
  # The validation split only: the one OOD sets read (train is a 24 GB download).
  filelist = fetch('filelist_places365-standard.tar', _PLACES + 'filelist_places365-standard.tar')
  return {'validation': archives.places365(fetch('val_256.tar', _PLACES + 'val_256.tar'),
                                           filelist, 'val')}


def _imagenet(fetch: Fetch) -> Splits:
  train = fetch('ILSVRC2012_img_train.tar', _IMAGENET)
  validation = fetch('ILSVRC2012_img_val.tar', _IMAGENET)
  # TFDS ships the validation images' classes (the devkit's ground truth, as wnids).
  labels_file = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
  wnids = labels_file.read_text().split()
  return {'train': archives.imagenet_train(train),
          'validation': archives.imagenet_validation(validation, wnids)}


def _food101(fetch: Fetch) -> Splits:
  path = fetch(*_FOOD101)
  return {'train': archives.food101(path, 'train'),
          'validation': archives.food101(path, 'test')}


def _flowers102(fetch: Fetch) -> Splits:
  images, labels, setid = (fetch(name, _FLOWERS + name)
                           for name in ('102flowers.tgz', 'imagelabels.mat', 'setid.mat'))
  return {split: archives.flowers102(images, labels, setid, key)
          for split, key in (('train', 'trnid'), ('validation', 'valid'), ('test', 'tstid'))}


def _stanford_dogs(fetch: Fetch) -> Splits:
  images, annotation, lists = (fetch(name, _DOGS + name)
                               for name in ('images.tar', 'annotation.tar', 'lists.tar'))
  return {split: archives.stanford_dogs(images, annotation, lists, split)
          for split in ('train', 'test')}


def _dog_breeds(fetch: Fetch) -> list[str]:
  return archives.stanford_dogs_breeds(fetch('lists.tar', _DOGS + 'lists.tar'))


def _oxford_iiit_pet(fetch: Fetch) -> Splits:
  from tensorflow_datasets.datasets.oxford_iiit_pet import oxford_iiit_pet_dataset_builder
  images, annotations = (fetch(name, _PETS + name)
                         for name in ('images.tar.gz', 'annotations.tar.gz'))
  reencode = frozenset(oxford_iiit_pet_dataset_builder._CORRUPT_SAMPLES)  # TFDS's list
  return {'train': archives.oxford_iiit_pet(images, annotations, 'trainval', reencode),
          'test': archives.oxford_iiit_pet(images, annotations, 'test', reencode)}


def _idx(url: str) -> Callable[[Fetch], Splits]:
  """MNIST's layout, which Fashion-MNIST copies: four IDX files, 28x28, ten classes."""
  files = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
           'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}

  def splits(fetch: Fetch) -> Splits:
    return {split: archives.idx(*(fetch(f'{stem}.gz', f'{url}{stem}.gz') for stem in stems),
                                image_size=28, num_classes=10)
            for split, stems in files.items()}
  return splits


SOURCES = {'cifar10': _cifar10, 'cifar100': _cifar100, 'svhn_cropped': _svhn, 'dtd': _dtd,
           'places365_small': _places365, 'imagenet2012': _imagenet, 'food101': _food101,
           'oxford_flowers102': _flowers102, 'stanford_dogs': _stanford_dogs,
           'oxford_iiit_pet': _oxford_iiit_pet, 'fashion_mnist': _idx(_FASHION_MNIST),
           'mnist': _idx(_MNIST)}
# Datasets whose TFDS builder names its classes from the files, not in code.
_LABEL_NAMES = {'stanford_dogs': _dog_breeds}


_DOWNLOAD_TRIES = 5  # a cut connection resumes (or starts over) this many times in one run
_CUT = (OSError, http.client.HTTPException)  # a reset, a timeout, an IncompleteRead


def _get(url: str, part: str) -> None:
  """One try: appends to `part` from where it ends if the server takes a Range request,
  else writes it afresh (and says so); an error of _CUT if the transfer stops short of the
  size the server announced."""
  have = os.path.getsize(part) if os.path.exists(part) else 0
  request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
  with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response:
    resumed = have and response.status == 206
    if have and not resumed:
      logging.warning('%s: the server does not resume downloads; starting it over',
                      os.path.basename(part))
    start = have if resumed else 0
    size = start + int(response.headers.get('Content-Length') or 0)
    with open(part, 'ab' if resumed else 'wb') as out:
      done, last_log = start, 0.0
      while chunk := response.read(1 << 20):
        out.write(chunk)
        done += len(chunk)
        if time.monotonic() - last_log > 10:
          last_log = time.monotonic()
          logging.info('%s: %.0f of %s MB', os.path.basename(part), done / 1e6,
                       f'{size / 1e6:.0f}' if size > start else '?')
  if size > start and done != size:
    raise http.client.IncompleteRead(b'', size - done)


def _md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _download(url: str, path: str, md5: str | None = None) -> None:
  """`url` to `path` through `path.part`, renamed when complete and, with `md5`, when its
  md5 is that. A cut transfer resumes from the part (HTTP Range) where the server allows,
  up to _DOWNLOAD_TRIES times; the part is kept for the next run's resume if they all fail."""
  part = path + '.part'
  for attempt in range(1, _DOWNLOAD_TRIES + 1):
    try:
      _get(url, part)
      break
    except _CUT as e:
      if attempt == _DOWNLOAD_TRIES:
        if os.path.exists(part) and not os.path.getsize(part):
          os.remove(part)
        raise
      logging.warning('%s: download cut off (%s); resuming, try %d of %d',
                      os.path.basename(path), e, attempt + 1, _DOWNLOAD_TRIES)
  if md5 is not None and (found := _md5(part)) != md5:
    os.remove(part)
    raise UserError(f'{os.path.basename(path)} downloaded from {url} has md5 {found}, not the '
                    f'{md5} its publisher gives: refused (removed); rerun to download it again, '
                    f'or put the right file in {os.path.dirname(path)}')
  os.replace(part, path)


def fetcher(manual_dir: str, installed: tuple[str, ...] = ()) -> Fetch:
  """A `Fetch` that finds files in `manual_dir`, then in the `installed` folders (a gzip'd
  file also unpacked, without its .gz), downloading the public ones that are absent (a
  download is checked against the size its server announces and the md5 its publisher
  gives, if any; files put there by hand are the user's)."""
  def fetch(name: str, published: str, md5: str | None = None) -> str:
    for where in (manual_dir, *installed):
      for candidate in dict.fromkeys((name, name.removesuffix('.gz'))):
        if os.path.isfile(os.path.join(where, candidate)):
          return os.path.join(where, candidate)
    path = os.path.join(manual_dir, name)
    if not published.startswith(('http://', 'https://')):  # by hand only (ImageNet)
      raise UserError(f'{name} is not in --manual_dir={manual_dir}: put it there '
                      f'(published at {published})')
    logging.info('Downloading %s from %s', name, published)
    os.makedirs(manual_dir, exist_ok=True)
    try:
      _download(published, path, md5)
    except (*_CUT, urllib.error.URLError) as e:  # offline, refused, timed out, disk full
      raise UserError(f'could not download {name} ({getattr(e, "reason", e)}): rerun to '
                      f'resume, or put it in --manual_dir={manual_dir} (published at '
                      f'{published})') from None
    return path
  return fetch


def _from_archives(name: str, data_dir: str, splits: Splits,
                   label_names: list[str] | None = None) -> tfds.core.DatasetBuilder:
  """TFDS's builder of `name` (same features, version and folder), fed from `splits`."""
  tfds_builder = tfds.builder_cls(name)

  class FromArchives(tfds_builder, skip_registration=True):
    code_path = None  # no download checksums to look up (TFDS would need importlib_resources)

    def _split_generators(self, dl_manager):
      del dl_manager  # the archives are read by `archives`
      if label_names:  # where TFDS's own builder sets them too
        self.info.features['label'].names = label_names
      return splits

  # The dataset on disk is then TFDS's own, module name included.
  FromArchives.name, FromArchives.__module__ = tfds_builder.name, tfds_builder.__module__
  return FromArchives(data_dir=data_dir, file_format='array_record')


def _refuse_overwrite(builder: tfds.core.DatasetBuilder, what: str, data_dir: str) -> None:
  if builder.is_prepared():
    raise UserError(f'{what} is already prepared in {data_dir}: datasets are never '
                    'overwritten (delete its folder first to prepare it again)')


def _build(builder: tfds.core.DatasetBuilder, what: str, data_dir: str) -> None:
  with build_lock.held(os.path.dirname(str(builder.data_path))):
    _refuse_overwrite(builder, what, data_dir)  # by a preparation that held the lock first
    start = time.perf_counter()
    builder.download_and_prepare()  # shows a progress bar per split
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  logging.info('Prepared %s in %s: %s examples (%.0f s)', what, builder.data_path, splits,
               time.perf_counter() - start)


def prepare(name: str, data_dir: str = DEFAULT_DATA_DIR, manual_dir: str | None = None) -> None:
  data_dir = os.path.expanduser(data_dir)
  manual_dir = os.path.expanduser(manual_dir or os.path.join(data_dir, 'downloads', 'manual'))
  if name.startswith(openood.PREFIX):
    folder_name = openood.folder_name(name)
    _refuse_overwrite(folder.builder(folder_name, data_dir), name, data_dir)
    files = openood.image_files(name, manual_dir)
    bad = folder.unreadable(files)
    if bad:
      path, why = next(iter(bad.items()))
      raise UserError(f'{len(bad)} images of {name} do not decode, e.g. {path} ({why}): '
                      'unpack OpenOOD\'s image zips again')
    _build(folder.builder(folder_name, data_dir, tuple(files)), name, data_dir)
    return
  if name not in SOURCES:
    raise UserError(f'cannot prepare {name!r}: valid: {sorted(SOURCES)} or '
                    f'{openood.PREFIX}BENCHMARK/LIST (an OpenOOD v1.5 list, e.g. '
                    'openood:cifar10/test_tin)')
  _refuse_overwrite(tfds.builder(name, data_dir=data_dir), name, data_dir)
  fetch = fetcher(manual_dir, INSTALLED.get(name, ()))
  splits = SOURCES[name](fetch)  # finds (or downloads) every file before writing
  label_names = _LABEL_NAMES[name](fetch) if name in _LABEL_NAMES else None
  _build(_from_archives(name, data_dir, splits, label_names), name, data_dir)


def command(name: str, data_dir: str) -> str:
  """The command line that prepares `name` (for error messages)."""
  if name.startswith(openood.PREFIX):
    flag, where = ' --manual_dir=DIR', " (DIR: OpenOOD's data/ folder)"
  elif name == 'imagenet2012':
    flag, where = ' --manual_dir=DIR', ' (DIR: the folder of ILSVRC2012_img_{train,val}.tar)'
  else:  # public files: downloaded, or found in DATA_DIR/downloads/manual
    flag, where = '', ''
  return f'`python -m mood_jax.data.prepare {name} --data_dir={data_dir}{flag}`{where}'


def main(argv=None) -> None:
  parser = command_line.parser('mood_jax.data.prepare', __doc__)
  parser.add_argument('name', help=f'one of {sorted(SOURCES)}, or openood:BENCHMARK/LIST')
  parser.add_argument('--data_dir', default=DEFAULT_DATA_DIR,
                      help="TFDS data dir: the config's data.data_dir")
  parser.add_argument('--manual_dir', default=None,
                      help='folder of the official files (None: DATA_DIR/downloads/manual); '
                           "for openood:..., OpenOOD's data/ folder")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    prepare(args.name, args.data_dir, args.manual_dir)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()

"""Fashion-MNIST (and MNIST, by the same reader) from IDX files in the official layout,
generated here: prepared as TFDS's own dataset, pixel- and label-exact; a damaged file is one
line and leaves nothing prepared; configs/fashion_mnist.py's smoke path end to end on them."""

import gzip
import io
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from mood_jax import pipeline
from mood_jax.data import catalogue, prepare
from mood_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def _idx(array: np.ndarray) -> bytes:
  """LeCun's IDX layout: 0x0000, type 0x08 (unsigned byte), the number of dimensions, each
  dimension's size as big-endian int32, then the bytes."""
  header = bytes((0, 0, 8, array.ndim)) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_idx_files(folder, rng, per_class=(6, 2), gzipped=True) -> dict:
  """The four files of a small Fashion-MNIST: `per_class` train and test images of each of
  the ten classes, in shuffled order. -> {split: (images, labels)}"""
  folder.mkdir(parents=True, exist_ok=True)
  expected = {}
  for (split, (images_name, labels_name)), n in zip(FILES.items(), per_class):
    labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
    # Each class brighter in its own 7x7 block, so a model can tell classes apart.
    images = rng.integers(0, 64, (len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
      row, col = divmod(int(label), 4)
      images[i, 7 * row:7 * row + 7, 7 * col:7 * col + 7] += 180
    for name, array in ((images_name, images), (labels_name, labels)):
      data = _idx(array)
      if gzipped:
        (folder / f'{name}.gz').write_bytes(gzip.compress(data))
      else:
        (folder / name).write_bytes(data)
    expected[split] = images, labels
  return expected


def _records(name, split, data_dir):
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def _pixels(encoded: bytes) -> np.ndarray:
  return np.asarray(PIL.Image.open(io.BytesIO(encoded)))


@pytest.fixture(scope='module')
def idx_files(tmp_path_factory):
  manual = tmp_path_factory.mktemp('manual')
  return manual, write_idx_files(manual, np.random.default_rng(0))


@pytest.fixture(scope='module')
def prepared(idx_files, tmp_path_factory):
  manual, expected = idx_files
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  prepare.prepare('fashion_mnist', data_dir, str(manual))
  return data_dir, expected


@pytest.mark.parametrize('name', ['fashion_mnist', 'mnist'])
def test_idx_files_become_tfds_own_dataset_pixel_and_label_exact(idx_files, tmp_path, name):
  manual, expected = idx_files
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare(name, data_dir, str(manual))
  builder = tfds.builder(name, data_dir=data_dir)
  ours = builder.info
  theirs = tfds.builder_cls(name)(data_dir=str(tmp_path / 'empty')).info
  assert (ours.full_name, ours.features.to_json()) == (theirs.full_name,
                                                       theirs.features.to_json())
  for split, (images, labels) in expected.items():
    records = _records(name, split, data_dir)
    assert len(records) == len(labels)
    # TFDS orders records by its hash of the key (the index, as its own builder's): compare
    # as multisets keyed by pixels.
    got = sorted((_pixels(r['image']).tobytes(), int(r['label'])) for r in records)
    want = sorted((image[..., None].tobytes(), int(label))
                  for image, label in zip(images, labels))
    assert got == want


def test_unpacked_files_and_installed_folder_are_found(tmp_path, monkeypatch):
  """Files without .gz in --manual_dir; else the system package's folder, used read-only."""
  expected = write_idx_files(tmp_path / 'unpacked', np.random.default_rng(1), gzipped=False)
  prepare.prepare('mnist', str(tmp_path / 'a'), str(tmp_path / 'unpacked'))
  assert len(_records('mnist', 'test', str(tmp_path / 'a'))) == len(expected['test'][1])
  write_idx_files(tmp_path / 'usr_share', np.random.default_rng(2))
  monkeypatch.setitem(prepare.INSTALLED, 'fashion_mnist', (str(tmp_path / 'usr_share'),))
  before = sorted(os.listdir(tmp_path / 'usr_share'))
  prepare.prepare('fashion_mnist', str(tmp_path / 'b'), str(tmp_path / 'empty_manual'))
  assert len(_records('fashion_mnist', 'train', str(tmp_path / 'b'))) == 60
  assert sorted(os.listdir(tmp_path / 'usr_share')) == before


def _damaged(kind: str, data: bytes) -> bytes:
  raw = gzip.decompress(data)
  if kind == 'gzip_cut':
    return data[:len(data) // 2]
  if kind == 'magic':
    return gzip.compress(b'\x00\x00\x08\x01' + raw[4:])  # a labels file's magic
  if kind == 'count':  # a header that says more images than the file holds
    return gzip.compress(raw[:4] + (int.from_bytes(raw[4:8], 'big') + 1).to_bytes(4, 'big')
                         + raw[8:])
  raise ValueError(kind)


@pytest.mark.parametrize('kind,says', [
    ('gzip_cut', 'is not a readable IDX file of images'),
    ('magic', 'is not an IDX file of images (magic number 00000801'),
    ('count', 'it is cut short or damaged')])
def test_a_damaged_file_is_one_line_and_nothing_is_prepared(idx_files, tmp_path, kind, says):
  manual, _ = idx_files
  broken = tmp_path / 'manual'
  broken.mkdir()
  for name in os.listdir(manual):
    data = (manual / name).read_bytes()
    if name == 't10k-images-idx3-ubyte.gz':  # the test split: written after train would be
      data = _damaged(kind, data)
    (broken / name).write_bytes(data)
  result = subprocess.run(
      [sys.executable, '-m', 'mood_jax.data.prepare', 'fashion_mnist',
       f'--data_dir={tmp_path / "tfds"}', f'--manual_dir={broken}'],
      cwd=ROOT, capture_output=True, text=True)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and says in last, result.stderr
  assert str(broken / 't10k-images-idx3-ubyte.gz') in last and 'Traceback' not in result.stderr
  assert not tfds.builder('fashion_mnist', data_dir=str(tmp_path / 'tfds')).is_prepared()
  assert not os.path.exists(tmp_path / 'tfds' / 'fashion_mnist')


def test_images_and_labels_of_different_splits_are_refused(idx_files, tmp_path):
  manual, _ = idx_files
  mixed = tmp_path / 'manual'
  mixed.mkdir()
  for name in os.listdir(manual):
    (mixed / name).write_bytes((manual / name).read_bytes())
  (mixed / 't10k-labels-idx1-ubyte.gz').write_bytes(
      (manual / 'train-labels-idx1-ubyte.gz').read_bytes())
  with pytest.raises(UserError, match='holds 20 images but .* 60 labels'):
    prepare.prepare('fashion_mnist', str(tmp_path / 'tfds'), str(mixed))

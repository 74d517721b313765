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

from mood_jax.run import pipeline
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


def _config(arg: str, data_dir: str):
  config = runpy.run_path(os.path.join(ROOT, 'configs', 'fashion_mnist.py'))['get_config'](arg)
  config.data.data_dir = data_dir
  return config


def _results(workdir) -> dict:
  with open(workdir / 'results' / 'results.json') as f:
    return json.load(f)


def test_smoke_config_trains_and_scores_every_set(prepared, tmp_path):
  data_dir, _ = prepared
  config = _config('smoke', data_dir)
  config.evaluate.plots = True
  pipeline.run(config, str(tmp_path))
  results = _results(tmp_path)
  plots = os.listdir(tmp_path / 'results' / 'plots')
  for model, scorer in {(row['model'], row['scorer']) for row in results['rows']}:
    assert f'{model}_{scorer}_extremes.png' in plots
  groups = {row['ood_set']: row['ood_group'] for row in results['rows']}
  assert groups['digits'] == 'far' and groups['uniform_noise'] == 'far'
  assert groups['letters'] == 'validation'
  assert {row['model'] for row in results['rows']} == {'finetune', 'logit_ft'}
  assert set(results['id_accuracy']) == {'finetune', 'logit_ft'}
  source = catalogue.source(config.data)
  assert source.channels == 1 and len(source.kept_indices('id_val')) == 10  # 1 of 6 a class


def test_split_smoke_holds_out_a_near_validation_class(prepared, tmp_path):
  data_dir, expected = prepared
  config = _config('split,smoke', data_dir)
  groups = catalogue.source(config.data).ood_groups()
  assert groups['fashion_mnist_heldout'] == 'near'
  assert groups['fashion_mnist_heldout_val'] == 'validation'
  pipeline.run(config, str(tmp_path))
  rows = _results(tmp_path)['rows']
  assert {'fashion_mnist_heldout', 'fashion_mnist_heldout_val'} <= {r['ood_set'] for r in rows}
  source = catalogue.source(config.data)
  test_labels = expected['test'][1]
  assert len(source.kept_indices('fashion_mnist_heldout')) == (test_labels >= 5).sum() - (
      test_labels == 9).sum()


def test_oneclass_smoke_scores_pretrain_and_random_init_encoders_per_class(prepared, tmp_path):
  data_dir, _ = prepared
  config = _config('oneclass=all,smoke', data_dir)
  config.data.id_classes = (0, 7)  # two of the ten classes: each costs a pretraining
  config.evaluate.models = 'pretrain,random_init'
  pipeline.run(config, str(tmp_path))
  for label in (0, 7):
    rows = _results(tmp_path / f'class_{label}')['rows']
    heldout = [r for r in rows if r['ood_set'] == 'fashion_mnist_heldout']
    assert {r['model'] for r in heldout} == {'pretrain', 'random_init'}
  mean = _results(tmp_path)['rows']
  assert {r['model'] for r in mean if r['ood_set'] == 'fashion_mnist_heldout'} == {
      'pretrain', 'random_init'}


@pytest.mark.slow  # four smoke runs: about 3 CPU-minutes
def test_study_smoke_grid_records_resumes_and_renders_from_its_csv(prepared, tmp_path):
  from benchmarks import fashion_mnist_study, study_records
  data_dir, _ = prepared
  command = [sys.executable, '-m', 'benchmarks.fashion_mnist_study', '--smoke',
             f'--data_dir={data_dir}', f'--out={tmp_path}']
  first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-3000:]
  records = tmp_path / 'records'
  cells = [cell.name for cell in fashion_mnist_study.grid(smoke=True)]
  assert cells == ['oneclass_0', 'oneclass_1', 'default', 'split']
  for cell in cells:
    record = json.loads((records / cell / 'seed0.json').read_text())
    assert record['cpu_seconds'] > 0 and record['commit']
  rows = study_records.read_csv(records / 'study.csv')
  doc = (tmp_path / 'results_fashion_mnist.md').read_text()
  meta = json.loads((records / 'study.json').read_text())
  assert doc == fashion_mnist_study.render(rows, meta)  # a function of the CSV alone
  # Both encoders of every one-class cell, every scorer of the multi-class ones.
  for label in (0, 1):
    for model in ('pretrain', 'random_init'):
      assert len(fashion_mnist_study.one_class_values(rows, model, label)) == 1
  assert 'GEOM' in doc and 'random-init encoder' in doc
  assert 'Classes with a run so far: 2 of 10' in doc
  assert {r['scorer'] for r in rows if r['cell'] == 'default'} >= {'msp', 'energy'}
  # A second invocation keeps every run (no training) and writes the same numbers.
  second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert second.returncode == 0 and second.stdout.count('done before, kept') == 4
  assert study_records.read_csv(records / 'study.csv') == rows

"""Image folders become ArrayRecord OOD sets without TensorFlow; bad files are reported, not fatal."""

import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
import PIL.Image
import pytest

from mood_jax.data import catalogue, data_config, folder, input_pipeline


def _write_images(root):
  """Three good colour images, one grayscale, a truncated JPEG and a text file named .png."""
  rng = np.random.default_rng(0)
  (root / 'sub').mkdir(parents=True)
  for i, (size, fmt) in enumerate([((40, 30), 'PNG'), ((64, 48), 'JPEG'), ((20, 20), 'JPEG')]):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(root / f'colour{i}.{fmt.lower()}', format=fmt)
  PIL.Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(
      root / 'sub' / 'gray.png')
  truncated = root / 'colour1.jpeg'
  (root / 'broken.jpg').write_bytes(truncated.read_bytes()[:200])
  (root / 'notes.png').write_text('not an image')
  (root / 'readme.txt').write_text('ignored: not an image suffix')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  _write_images(root)
  data_dir = tmp_path_factory.mktemp('tfds')
  return root, data_dir, folder.build('mini', str(root), str(data_dir))


def test_builds_and_reports_bad_files(built):
  root, _, (count, bad) = built
  assert count == 4
  assert sorted(bad) == [str(root / 'broken.jpg'), str(root / 'notes.png')]
  assert all(bad.values())  # each with its reason


@pytest.mark.parametrize('num_workers', [0, 1])
def test_reads_back_through_grain_as_rgb(built, num_workers):
  _, data_dir, _ = built
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which absl.app would parse
  data = data_config.default_data_config()
  data.update(name='cifar10', data_dir=str(data_dir), image_size=16, id_classes=(),
              ood_sets=('folder:mini',), num_workers=num_workers)
  batches, count = input_pipeline.eval_dataset(data, 'folder:mini', global_batch_size=8)
  batch = next(iter(batches))
  assert count == 4
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['valid'].sum() == 4 and np.all(batch['label'][batch['valid']] == -1)
  assert 'tensorflow' not in sys.modules


def test_never_overwrites(built):
  root, data_dir, _ = built
  with pytest.raises(ValueError, match='folder:mini already exists'):
    folder.build('mini', str(root), str(data_dir))


def test_file_list_and_cli(built, tmp_path, capsys):
  root, _, _ = built
  listing = root / 'list.txt'
  listing.write_text('colour0.png\nsub/gray.png\nbroken.jpg\n\n')
  folder.main(['--name=listed', f'--source={listing}', f'--data_dir={tmp_path}'])
  out = capsys.readouterr().out
  assert f'unreadable: {root / "broken.jpg"}' in out
  assert 'folder:listed: 2 images stored, 1 unreadable files left out' in out
  with pytest.raises(SystemExit, match='neither a folder nor a file list'):
    folder.main(['--name=x', f'--source={tmp_path / "missing"}', f'--data_dir={tmp_path}'])


def _labelled_images(root, per_class=10, size=20):
  """Class subfolders of RGB PNGs: stripes one way, the other way, and checks, with noise."""
  rng = np.random.default_rng(1)
  grid = np.indices((size, size))
  patterns = {'horizontal': grid[0] // 3 % 2, 'vertical': grid[1] // 3 % 2,
              'checks': (grid[0] // 4 + grid[1] // 4) % 2}
  for name, pattern in patterns.items():
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = pattern[..., None] * 180 + rng.integers(0, 60, (size, size, 3))
      PIL.Image.fromarray(pixels.astype(np.uint8)).save(root / name / f'{i}.png')
  return sorted(patterns)


@pytest.fixture(scope='module')
def labelled(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp('labelled')
  classes = _labelled_images(root)
  (root / 'checks' / 'broken.png').write_text('not an image')
  noise = tmp_path_factory.mktemp('noise')
  rng = np.random.default_rng(2)
  for i in range(12):
    PIL.Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(noise / f'{i}.png')
  built = folder.build('shapes', str(root), data_dir, labelled=True, test_fraction=0.3)
  folder.build('noise', str(noise), data_dir)
  return root, classes, built


def test_labelled_folder_has_classes_and_a_split_per_class(labelled, data_dir):
  root, classes, (count, bad) = labelled
  assert count == 30 and list(bad) == [str(root / 'checks' / 'broken.png')]
  assert folder.class_names('shapes', data_dir) == classes
  train, test = (folder.file_names('shapes', data_dir, split) for split in ('train', 'test'))
  assert sorted(train + test) == sorted(f'{c}/{i}.png' for c in classes for i in range(10))
  assert sorted(name.split('/')[0] for name in test) == sorted(classes * 3)  # 30% of each
  data = data_config.default_data_config()
  data.update(name='folder:shapes', data_dir=data_dir, image_size=16, id_classes=(),
              ood_sets=('folder:noise',))
  assert catalogue.source(data).num_classes() == 3
  batches, num_test = input_pipeline.eval_dataset(data, 'id_test', global_batch_size=16)
  batch = next(iter(batches))
  assert num_test == 9 and batch['image'].shape == (16, 16, 16, 3)
  # Records keep the listed order: each one's label is its file's class folder.
  expected = [classes.index(name.split('/')[0]) for name in test]
  assert list(batch['label'][batch['valid']]) == expected


def test_folder_ood_set_with_the_embedded_digits(labelled, data_dir):
  """Grayscale at the digits' image size, by the detector's resize rule."""
  data = data_config.default_data_config()
  data.update(data_dir=data_dir, image_size=12, ood_sets=('folder:noise', 'textures'))
  assert catalogue.source(data).ood_groups() == {'folder:noise': 'far', 'textures': 'far'}
  batches, count = input_pipeline.eval_dataset(data, 'folder:noise', global_batch_size=16)
  batch = next(iter(batches))
  assert count == 12 and batch['image'].shape == (16, 12, 12, 1)
  assert np.all(batch['label'][batch['valid']] == -1)


def test_labelled_folder_errors(labelled, data_dir, tmp_path):
  data = data_config.default_data_config()
  data.update(name='folder:noise', data_dir=data_dir, id_classes=())
  with pytest.raises(ValueError, match='has no class labels'):
    catalogue.source(data).num_classes()
  data.name = 'folder:absent'
  with pytest.raises(ValueError, match='not prepared .* --labelled'):
    catalogue.source(data).num_classes()
  with pytest.raises(ValueError, match='no class subfolders'):
    folder.build('flat', str(labelled[0] / 'checks'), data_dir, labelled=True)


def test_labelled_folder_as_id_data_trains_and_evaluates(labelled, data_dir, env, tmp_path):
  workdir = tmp_path / 'workdir'
  proc = subprocess.run(
      [sys.executable, '-m', 'mood_jax.main', '--config=configs/digits.py:smoke',
       f'--workdir={workdir}', '--config.stages=finetune,evaluate',
       '--config.finetune.init_from=scratch',  # pretraining reads the same train batches
       '--config.data.name=folder:shapes', '--config.data.id_classes=()',
       "--config.data.ood_sets=('folder:noise',)", f'--config.data.data_dir={data_dir}'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'results' / 'results.json') as f:
    results = json.load(f)
  assert {row['ood_set'] for row in results['rows']} >= {'folder:noise'}
  assert set(results['id_accuracy']) == {'finetune'}
  with np.load(workdir / 'results' / 'scores.npz') as npz:  # folder sets' ids: file names
    assert sorted(npz['ids/folder:noise']) == sorted(f'{i}.png' for i in range(12))
    assert sorted(npz['ids/id']) == sorted(folder.file_names('shapes', data_dir, 'test'))
  with open(workdir / 'detector' / 'detector.json') as f:
    preprocessing = json.load(f)['preprocessing']
  assert preprocessing['channels'] == 3 and preprocessing['image_size'] == 16

"""Image folders become ArrayRecord OOD sets without TensorFlow; bad files are reported, not fatal."""

import sys

from absl import flags
import numpy as np
import PIL.Image
import pytest

from mood_jax.data import folder, input_pipeline


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
  data = input_pipeline.default_data_config()
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

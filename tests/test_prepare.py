"""`python -m mood_jax.data.prepare`: tiny archives in the official layouts become the datasets
the configs read, pixel- and label-exact, without TensorFlow; interruptions, bad files are safe."""

import glob
import io
import json
import os
import pickle
import runpy
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error

import numpy as np
import PIL.Image
import pytest
import scipy.io
import tensorflow_datasets as tfds

from mood_jax.run import pipeline
from mood_jax.data import catalogue, data_config, folder, prepare
from mood_jax.data.sources import ood_sets, openood
from mood_jax.data.sources.source import HELDOUT_SUFFIX, HELDOUT_VALIDATION_SUFFIX
from mood_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_CLASS = 2  # CIFAR images per class and batch


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _jpeg(rng, size=(20, 16)) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, 'JPEG')
  return buffer.getvalue()


def _voc(width, height, *boxes) -> bytes:
  """A PASCAL VOC annotation, as Stanford Dogs' and Oxford-IIIT Pet's: (xmin, ymin, xmax, ymax)."""
  objects = ''.join(f'<object><name>x</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>'
                    f'<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>'
                    for x0, y0, x1, y1 in boxes)
  return (f'<annotation><folder>f</folder><size><width>{width}</width><height>{height}</height>'
          f'<depth>3</depth></size><segment>0</segment>{objects}</annotation>').encode()


def _mat(paths) -> bytes:
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {'file_list': np.array([[p] for p in paths], dtype=object)})
  return buffer.getvalue()


def _png(pixels) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, 'PNG')
  return buffer.getvalue()


def _write_stanford_dogs(manual, rng):
  """120 breeds (TFDS's class count) with one train image each; two test images, one with
  two dogs, one box past the image's edge; an unlisted image. -> {member: (jpeg, boxes)}"""
  breeds = [f'n{2085620 + i:08d}-Breed_{i}' for i in range(120)]
  train = [f'{breed}/{breed[:9]}_1.jpg' for breed in breeds]
  test = [f'{breeds[3]}/{breeds[3][:9]}_2.jpg', f'{breeds[7]}/{breeds[7][:9]}_3.jpg']
  unlisted = f'{breeds[0]}/{breeds[0][:9]}_9.jpg'
  expected = {}
  with tarfile.open(manual / 'images.tar', 'w') as images, \
      tarfile.open(manual / 'annotation.tar', 'w') as annotation:
    for path in train + test + [unlisted]:
      boxes = ((2, 1, 15, 19), (0, 5, 17, 20)) if path == test[0] else ((3, 4, 10, 12),)
      expected[f'Images/{path}'] = _jpeg(rng), boxes
      _add(images, f'Images/{path}', expected[f'Images/{path}'][0])
      _add(annotation, f'Annotation/{path[:-len(".jpg")]}', _voc(16, 20, *boxes))
  with tarfile.open(manual / 'lists.tar', 'w') as lists:
    for name, paths in (('file', train + test), ('train', train), ('test', test)):
      _add(lists, f'{name}_list.mat', _mat(paths))
  return expected


def _write_oxford_iiit_pet(manual, rng):
  """Two trainval images with head boxes, one of them an RGBA PNG that TFDS re-encodes
  (Abyssinian_5), one test image without; trimaps of 1, 2, 3. -> {name: (image, trimap,
  class, species, head box or None)}; images.tar.gz is a plain tar, as the official one."""
  gradient = np.linspace(0, 255, 20 * 16 * 4).reshape(20, 16, 4).astype(np.uint8)
  expected = {
      'Abyssinian_1': (_jpeg(rng), 1, 1, (2, 3, 12, 17)),
      'Abyssinian_5': (_png(gradient), 1, 1, (0, 0, 16, 20)),
      'beagle_7': (_jpeg(rng), 5, 2, (1, 1, 8, 9)),
      'pug_2': (_jpeg(rng), 26, 2, None)}
  expected = {name: (image, rng.integers(1, 4, (20, 16), dtype=np.uint8), label, species, head)
              for name, (image, label, species, head) in expected.items()}
  with tarfile.open(manual / 'images.tar.gz', 'w') as images, \
      tarfile.open(manual / 'annotations.tar.gz', 'w:gz') as annotations:
    for name, (image, trimap, _, _, head) in expected.items():
      _add(images, f'images/{name}.jpg', image)
      _add(annotations, f'annotations/trimaps/{name}.png', _png(trimap))
      if head:
        _add(annotations, f'annotations/xmls/{name}.xml', _voc(16, 20, head))
    for list_name, names in (('trainval', ('Abyssinian_1', 'Abyssinian_5', 'beagle_7')),
                             ('test', ('pug_2',))):
      lines = ''.join(f'{n} {expected[n][2]} {expected[n][3]} 1\n' for n in names)
      _add(annotations, f'annotations/{list_name}.txt', lines.encode())
  return expected


def _cifar_batch(rng, num_classes, coarse=False):
  labels = np.repeat(np.arange(num_classes), PER_CLASS)
  batch = {b'data': rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}
  if coarse:  # CIFAR-100: fine and coarse labels
    batch.update({b'fine_labels': labels.tolist(), b'coarse_labels': (labels // 5).tolist()})
  else:
    batch[b'labels'] = labels.tolist()
  return batch


def _write_archives(manual, rng):
  """The official files, tiny: what each loader is expected to have read."""
  expected = {}
  with tarfile.open(manual / 'cifar-10-python.tar.gz', 'w:gz') as tar:
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    batches = {name: _cifar_batch(rng, 10) for name in names}
    for name, batch in batches.items():
      _add(tar, f'cifar-10-batches-py/{name}', pickle.dumps(batch))
  expected['cifar10'] = batches
  with tarfile.open(manual / 'cifar-100-python.tar.gz', 'w:gz') as tar:
    batches = {name: _cifar_batch(rng, 100, coarse=True) for name in ('train', 'test')}
    for name, batch in batches.items():
      _add(tar, f'cifar-100-python/{name}', pickle.dumps(batch))
  expected['cifar100'] = batches
  for split in ('train', 'test'):  # SVHN: [32, 32, 3, N] and labels 1..10 (10 is digit 0)
    scipy.io.savemat(manual / f'{split}_32x32.mat', {
        'X': rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8),
        'y': np.array([[10], [1], [2], [9], [10]], dtype=np.uint8)})
  # ImageNet: a tar of per-class tars, and a flat validation tar whose classes TFDS ships.
  train = {}
  with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as tar:
    for wnid in ('n01440764', 'n15075141'):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(2):
          train[f'{wnid}_{i}.JPEG'] = (wnid, _jpeg(rng))
          _add(class_tar, f'{wnid}_{i}.JPEG', train[f'{wnid}_{i}.JPEG'][1])
      _add(tar, f'{wnid}.tar', inner.getvalue())
  validation = {}
  with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as tar:
    for i in (1, 2, 50_000):
      name = f'ILSVRC2012_val_{i:08d}.JPEG'
      validation[name] = _jpeg(rng)
      _add(tar, name, validation[name])
  expected['imagenet2012'] = train, validation
  # DTD: images by class, and the partitions' file lists, in one tarball.
  dtd = {f'{texture}/{texture}_{i:04d}.jpg': _jpeg(rng) for texture in ('banded', 'zigzagged')
         for i in range(3)}
  with tarfile.open(manual / 'dtd-r1.0.1.tar.gz', 'w:gz') as tar:
    for name, jpeg in dtd.items():
      _add(tar, f'dtd/images/{name}', jpeg)
    for split, index in (('train1', 0), ('val1', 1), ('test1', 2)):
      listed = [name for name in dtd if name.endswith(f'{index:04d}.jpg')]
      _add(tar, f'dtd/labels/{split}.txt', ''.join(n + '\n' for n in listed).encode())
  expected['dtd'] = dtd
  # Places365: the validation images' tar, and the file lists' tar with their classes.
  places = {f'Places365_val_{i:08d}.jpg': (i * 7 % 365, _jpeg(rng)) for i in (1, 2, 3)}
  with tarfile.open(manual / 'val_256.tar', 'w') as tar:
    for name, (_, jpeg) in places.items():
      _add(tar, f'val_256/{name}', jpeg)
  with tarfile.open(manual / 'filelist_places365-standard.tar', 'w') as tar:
    _add(tar, 'places365_val.txt',
         ''.join(f'{name} {label}\n' for name, (label, _) in places.items()).encode())
  expected['places365_small'] = places
  # Food-101: images by class and the splits' JSON lists in one tarball.
  food = {f'{dish}/{i}': _jpeg(rng) for dish in ('apple_pie', 'waffles') for i in (11, 12)}
  with tarfile.open(manual / 'food-101.tar.gz', 'w:gz') as tar:
    for name, jpeg in food.items():
      _add(tar, f'food-101/images/{name}.jpg', jpeg)
    for split, i in (('train', 11), ('test', 12)):
      listed = {dish: [f'{dish}/{i}'] for dish in ('apple_pie', 'waffles')}
      _add(tar, f'food-101/meta/{split}.json', json.dumps(listed).encode())
  expected['food101'] = food
  # Oxford Flowers 102: the images' tarball, 1-based labels and split ids as MATLAB files.
  flowers = {i: (label, _jpeg(rng)) for i, label in ((1, 77), (2, 1), (3, 102))}
  with tarfile.open(manual / '102flowers.tgz', 'w:gz') as tar:
    for i, (_, jpeg) in flowers.items():
      _add(tar, f'jpg/image_{i:05d}.jpg', jpeg)
  scipy.io.savemat(manual / 'imagelabels.mat', {'labels': np.array([[77, 1, 102]])})
  scipy.io.savemat(manual / 'setid.mat', {'trnid': np.array([[2]]), 'valid': np.array([[3]]),
                                          'tstid': np.array([[1]])})
  expected['oxford_flowers102'] = flowers
  expected['stanford_dogs'] = _write_stanford_dogs(manual, rng)
  expected['oxford_iiit_pet'] = _write_oxford_iiit_pet(manual, rng)
  # OpenOOD's data/ folder: a benchmark list and the images it names.
  (manual / 'benchmark_imglist' / 'cifar10').mkdir(parents=True)
  (manual / 'images_classic' / 'tin' / 'val').mkdir(parents=True)
  lines = []
  for i in range(6):
    path = manual / 'images_classic' / 'tin' / 'val' / f'{i}.png'
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    lines.append(f'tin/val/{i}.png -1')
  (manual / 'benchmark_imglist' / 'cifar10' / 'test_tin.txt').write_text('\n'.join(lines) + '\n')
  return expected


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Every format prepared once into one data dir: (data dir, manual dir, expected contents)."""
  manual = tmp_path_factory.mktemp('manual')
  expected = _write_archives(manual, np.random.default_rng(0))
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for name in ('cifar10', 'cifar100', 'svhn_cropped', 'imagenet2012', 'dtd', 'places365_small',
               'food101', 'oxford_flowers102', 'stanford_dogs', 'oxford_iiit_pet',
               'openood:cifar10/test_tin'):
    prepare.prepare(name, data_dir, str(manual))
  return data_dir, manual, expected


def _records(name, split, data_dir, **kwargs):
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={'image': tfds.decode.SkipDecoding()}, **kwargs)
  return [source[i] for i in range(len(source))]


def _pixels(encoded: bytes) -> np.ndarray:
  return np.asarray(PIL.Image.open(io.BytesIO(encoded)))


@pytest.mark.parametrize('name,label_keys', [
    ('cifar10', {'label': b'labels'}),
    ('cifar100', {'label': b'fine_labels', 'coarse_label': b'coarse_labels'})])
def test_cifar_tarballs_round_trip_pixels_and_labels(prepared, name, label_keys):
  data_dir, _, expected = prepared
  batches = list(expected[name].values())
  train, test = batches[:-1], batches[-1:]
  for split, split_batches in (('train', train), ('test', test)):
    images = np.concatenate([b[b'data'] for b in split_batches]).reshape(-1, 3, 32, 32)
    records = _records(name, split, data_dir)
    assert len(records) == len(images)
    for record in records:
      index = int(record['id'].decode().rsplit('_', 1)[1])
      np.testing.assert_array_equal(_pixels(record['image']), images[index].transpose(1, 2, 0))
      for feature, key in label_keys.items():
        labels = np.concatenate([b[key] for b in split_batches])
        assert record[feature] == labels[index]


def test_svhn_mat_round_trips_and_maps_10_to_digit_0(prepared):
  data_dir, manual, _ = prepared
  mat = scipy.io.loadmat(manual / 'test_32x32.mat')
  records = sorted(_records('svhn_cropped', 'test', data_dir), key=lambda r: r['id'])
  assert [int(r['label']) for r in records] == [0, 1, 2, 9, 0]
  for i, record in enumerate(records):
    np.testing.assert_array_equal(_pixels(record['image']), mat['X'][..., i])


def test_imagenet_tars_keep_jpeg_bytes_and_wnid_labels(prepared):
  data_dir, _, expected = prepared
  train, validation = expected['imagenet2012']
  names = ood_sets.features('imagenet2012')['label'].names
  wnids = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt').read_text().split()
  got = {r['file_name'].decode(): r for r in _records('imagenet2012', 'train', data_dir)}
  assert set(got) == set(train)
  for name, (wnid, jpeg) in train.items():
    assert got[name]['image'] == jpeg and names[got[name]['label']] == wnid
  got = {r['file_name'].decode(): r for r in _records('imagenet2012', 'validation', data_dir)}
  for name, jpeg in validation.items():
    index = int(name[len('ILSVRC2012_val_'):-len('.JPEG')]) - 1
    assert got[name]['image'] == jpeg and names[got[name]['label']] == wnids[index]


def test_dtd_and_places365_keep_jpeg_bytes_and_labels(prepared):
  data_dir, _, expected = prepared
  names = ood_sets.features('dtd')['label'].names
  for split, index in (('train', 0), ('validation', 1), ('test', 2)):
    got = {r['file_name'].decode(): r for r in _records('dtd', split, data_dir)}
    assert set(got) == {n for n in expected['dtd'] if n.endswith(f'{index:04d}.jpg')}
    for name, record in got.items():
      assert record['image'] == expected['dtd'][name]
      assert names[record['label']] == name.split('/')[0]
  got = {r['filename'].decode(): r for r in _records('places365_small', 'validation', data_dir)}
  assert set(got) == {f'val_256/{name}' for name in expected['places365_small']}
  for name, (label, jpeg) in expected['places365_small'].items():
    assert got[f'val_256/{name}']['image'] == jpeg and got[f'val_256/{name}']['label'] == label


def test_imagenet30_ood_sets_food101_and_flowers102(prepared):
  data_dir, _, expected = prepared
  names = ood_sets.features('food101')['label'].names
  for split, i in (('train', 11), ('validation', 12)):
    got = {r['image']: names[r['label']] for r in _records('food101', split, data_dir)}
    assert got == {jpeg: name.split('/')[0] for name, jpeg in expected['food101'].items()
                   if name.endswith(f'/{i}')}
  for split, i in (('train', 2), ('validation', 3), ('test', 1)):
    (record,) = _records('oxford_flowers102', split, data_dir)
    label, jpeg = expected['oxford_flowers102'][i]
    assert record['file_name'].decode() == f'image_{i:05d}.jpg'
    assert record['image'] == jpeg and record['label'] == label - 1


def test_stanford_dogs_keeps_jpeg_bytes_breeds_and_normalised_boxes(prepared):
  data_dir, _, expected = prepared
  names = tfds.builder('stanford_dogs', data_dir=data_dir).info.features['label'].names
  assert len(names) == 120 and names[3] == 'n02085623-breed_3'  # from the train list, as TFDS
  for split, count in (('train', 120), ('test', 2)):
    records = _records('stanford_dogs', split, data_dir)
    assert len(records) == count  # the unlisted image is in neither
    for record in records:
      member = record['image/filename'].decode()
      jpeg, boxes = expected['stanford_dogs'][member]
      assert record['image'] == jpeg
      assert names[record['label']] == member.split('/')[1].lower()
      want = [[min(y0 / 20, 1), min(x0 / 16, 1), min(y1 / 20, 1), min(x1 / 16, 1)]
              for x0, y0, x1, y1 in boxes]
      np.testing.assert_allclose(record['objects']['bbox'], want, rtol=1e-6)


def test_oxford_iiit_pet_keeps_images_trimaps_labels_and_head_boxes(prepared):
  data_dir, _, expected = prepared
  for split, want in (('train', {'Abyssinian_1', 'Abyssinian_5', 'beagle_7'}),
                      ('test', {'pug_2'})):
    got = {r['file_name'].decode(): r for r in _records('oxford_iiit_pet', split, data_dir)}
    assert set(got) == {f'{name}.jpg' for name in want}
    for name in want:
      image, trimap, label, species, head = expected['oxford_iiit_pet'][name]
      record = got[f'{name}.jpg']
      assert (record['label'], record['species']) == (label - 1, species - 1)
      # TFDS decodes the mask as its feature says: one channel, the trimap's 1, 2, 3.
      np.testing.assert_array_equal(record['segmentation_mask'], trimap[..., None])
      box = [head[1] / 20, head[0] / 16, head[3] / 20, head[2] / 16] if head else [0] * 4
      np.testing.assert_allclose(record['head_bbox'], box, rtol=1e-6)
      if name == 'Abyssinian_5':  # an RGBA PNG: a JPEG of its RGB now, as TFDS stores it
        rgb = np.asarray(PIL.Image.open(io.BytesIO(image)))[..., :3].astype(int)
        assert PIL.Image.open(io.BytesIO(record['image'])).format == 'JPEG'
        assert np.abs(_pixels(record['image']).astype(int) - rgb).max() <= 8
      else:
        assert record['image'] == image


def test_openood_list_becomes_an_ood_set_in_its_group(prepared):
  data_dir, manual, _ = prepared
  which = 'openood:cifar10/test_tin'
  config = folder.FolderConfig(name=openood.folder_name(which))
  records = _records('mood_folder', folder.SPLIT, data_dir, builder_kwargs={'config': config})
  listed = openood.image_files(which, str(manual))
  assert sorted(r['image'] for r in records) == sorted(open(p, 'rb').read() for p in listed)
  cifar10 = data_config.default_data_config()
  cifar10.name = 'cifar10'
  source = catalogue.source(cifar10)
  assert source.ood_group(which) == 'near'
  assert source.ood_group('openood:cifar10/test_mnist') == 'far'
  assert source.ood_group('openood:cifar10/val_tin') == 'validation'


def test_smoke_config_trains_and_evaluates_on_prepared_data(prepared, tmp_path):
  data_dir, _, _ = prepared
  config = runpy.run_path(os.path.join(ROOT, 'configs', 'cifar10.py'))['get_config']('smoke')
  config.data.update(data_dir=data_dir, ood_sets=('openood:cifar10/test_tin', 'svhn_cropped'),
                     validation_ood_sets=())
  config.stages, config.finetune.init_from = 'finetune,evaluate', 'scratch'
  pipeline.run(config, str(tmp_path))
  rows = (tmp_path / 'results' / 'results.csv').read_text()
  assert 'openood:cifar10/test_tin' in rows and 'svhn_cropped' in rows


def test_every_dataset_a_config_reads_is_prepared_by_our_command():
  """No config names a TFDS dataset that `prepare` cannot make (folders have their own tool)."""
  presets = {'cifar10_oneclass': ('class=3', 'superclass=3')}
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    name = os.path.basename(path)[:-len('.py')]
    for arg in presets.get(name, ('',)):
      data = runpy.run_path(path)['get_config'](arg).data
      if data.name == 'digits':  # embedded: built by the run itself
        continue
      embedded_sets = catalogue.source(data).own_ood_sets  # built by the run too
      for which in (data.name, *data.ood_sets):
        if (which.startswith(folder.PREFIX) or which.endswith(HELDOUT_SUFFIX) or
            which.endswith(HELDOUT_VALIDATION_SUFFIX) or which in embedded_sets):
          continue
        assert which in prepare.SOURCES or which.startswith(openood.PREFIX), (name, which)
        command = ood_sets.prepare_command(which, 'D')
        assert command.startswith(f'`python -m mood_jax.data.prepare {which} --data_dir=D')
  assert set(ood_sets.TFDS_SPLITS) <= set(prepare.SOURCES)


def test_a_prepared_dataset_is_never_overwritten(prepared):
  data_dir, manual, _ = prepared
  for name in ('cifar10', 'openood:cifar10/test_tin'):
    with pytest.raises(UserError, match='already prepared'):
      prepare.prepare(name, data_dir, str(manual))


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'mood_jax.data.prepare', *args], cwd=ROOT,
                        capture_output=True, text=True, env=env)


def test_offline_names_the_file_and_where_it_is_published(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError('no network')
  monkeypatch.setattr(prepare.urllib.request, 'urlopen', offline)
  with pytest.raises(UserError) as error:
    prepare.prepare('svhn_cropped', str(tmp_path / 'tfds'), str(tmp_path / 'manual'))
  message = str(error.value)
  assert 'train_32x32.mat' in message and f'--manual_dir={tmp_path / "manual"}' in message
  assert 'http://ufldl.stanford.edu/housenumbers/train_32x32.mat' in message
  assert not os.listdir(tmp_path / 'manual')  # no partial download left
  with pytest.raises(UserError, match='ILSVRC2012_img_train.tar is not in --manual_dir'):
    prepare.prepare('imagenet2012', str(tmp_path / 'tfds'), str(tmp_path / 'manual'))


@pytest.mark.parametrize('name,files,broken', [
    ('stanford_dogs', ('images.tar', 'annotation.tar', 'lists.tar'), 'annotation.tar'),
    ('stanford_dogs', ('images.tar', 'annotation.tar', 'lists.tar'), 'images.tar'),
    ('oxford_iiit_pet', ('images.tar.gz', 'annotations.tar.gz'), 'annotations.tar.gz'),
    ('oxford_iiit_pet', ('images.tar.gz', 'annotations.tar.gz'), 'images.tar.gz')])
def test_corrupt_imagenet30_ood_archive_names_the_file(prepared, tmp_path, name, files, broken):
  _, manual, _ = prepared
  (tmp_path / 'manual').mkdir()
  for file in files:
    data = (manual / file).read_bytes()
    if file == broken:  # cut inside a member's data (a cut at a header reads as a shorter tar)
      with tarfile.open(manual / file) as tar:
        member = tar.getmembers()[len(tar.getmembers()) // 2]
      data = data[:member.offset_data + member.size // 2] if file.endswith('.tar') else \
          data[:len(data) // 2]
    (tmp_path / 'manual' / file).write_bytes(data)
  with pytest.raises(UserError) as error:
    prepare.prepare(name, str(tmp_path / 'tfds'), str(tmp_path / 'manual'))
  message = str(error.value)
  assert str(tmp_path / 'manual' / broken) in message and '\n' not in message
  assert not tfds.builder(name, data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_an_archive_short_of_a_listed_image_names_the_file(prepared, tmp_path):
  """A tar cut at a member's header reads as a shorter tar, without an error from tarfile:
  the split's list catches it (here DTD, with one image of test1.txt left out)."""
  _, manual, _ = prepared
  short = tmp_path / 'manual' / 'dtd-r1.0.1.tar.gz'
  short.parent.mkdir()
  with tarfile.open(manual / 'dtd-r1.0.1.tar.gz') as full, tarfile.open(short, 'w:gz') as tar:
    listed = full.extractfile('dtd/labels/test1.txt').read().decode().split()
    for member in full.getmembers():
      if member.name != f'dtd/images/{listed[0]}':
        tar.addfile(member, full.extractfile(member))
  with pytest.raises(UserError, match=rf'^{short} lacks 1 of the {len(listed)} images that '
                                      r'test1.txt lists: download it again$'):
    prepare.prepare('dtd', str(tmp_path / 'tfds'), str(tmp_path / 'manual'))
  assert not tfds.builder('dtd', data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_corrupt_archive_is_one_line_naming_the_file(prepared, tmp_path):
  _, manual, _ = prepared
  (tmp_path / 'manual').mkdir()
  corrupt = tmp_path / 'manual' / 'cifar-10-python.tar.gz'
  corrupt.write_bytes((manual / 'cifar-10-python.tar.gz').read_bytes()[:3000])
  result = _cli('cifar10', f'--data_dir={tmp_path / "tfds"}', f'--manual_dir={tmp_path / "manual"}')
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and str(corrupt) in last and 'Traceback' not in result.stderr
  assert not tfds.builder('cifar10', data_dir=str(tmp_path / 'tfds')).is_prepared()


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('echo should not run',))


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
  with tarfile.open(tmp_path / 'cifar-100-python.tar.gz', 'w:gz') as tar:
    for name in ('train', 'test'):
      _add(tar, f'cifar-100-python/{name}', pickle.dumps({b'data': _RunsCode()}))
  with pytest.raises(UserError, match='system is not part of a CIFAR batch'):
    prepare.prepare('cifar100', str(tmp_path / 'tfds'), str(tmp_path))


_KILLED_MID_WRITE = """
import os, signal, sys
from mood_jax.data import archives, prepare
encode, count = archives.png, [0]
def png_then_die(pixels):
  count[0] += 1
  if count[0] == 30:  # CIFAR-10's train split is half written
    os.kill(os.getpid(), signal.SIGKILL)
  return encode(pixels)
archives.png = png_then_die
prepare.main(sys.argv[1:])
"""


def test_interrupted_preparation_leaves_nothing_a_run_reads_and_a_rerun_completes(prepared,
                                                                                    tmp_path):
  _, manual, _ = prepared
  data_dir = str(tmp_path / 'tfds')
  args = ['cifar10', f'--data_dir={data_dir}', f'--manual_dir={manual}']
  killed = subprocess.run([sys.executable, '-c', _KILLED_MID_WRITE, *args], cwd=ROOT,
                          capture_output=True, text=True)
  assert killed.returncode == -signal.SIGKILL
  assert os.listdir(os.path.join(data_dir, 'cifar10')) != []  # the unfinished temporary folder
  assert not tfds.builder('cifar10', data_dir=data_dir).is_prepared()
  with pytest.raises(Exception):  # what a run would read is not there
    tfds.data_source('cifar10', split='train', data_dir=data_dir, download=False)
  assert _cli(*args).returncode == 0
  left = sorted(os.listdir(os.path.join(data_dir, 'cifar10')))
  assert left == ['.prepare.lock', '3.0.2']  # the leftover is gone
  assert len(_records('cifar10', 'train', data_dir)) == 5 * 10 * PER_CLASS


# The first preparation stops half-way through CIFAR-10's train split until told to go on; the
# second says when it asks for the lock. Both take the folder of those signals first.
_PAUSED_MID_WRITE = """
import os, sys, time
from mood_jax.data import archives, prepare
encode, count, signals = archives.png, [0], sys.argv.pop(1)
def png_paused(pixels):
  count[0] += 1
  if count[0] == 30:
    open(os.path.join(signals, 'paused'), 'w').close()
    for _ in range(6000):  # 5 min at most: a failed test leaves no process behind for long
      if os.path.exists(os.path.join(signals, 'go_on')):
        break
      time.sleep(0.05)
  return encode(pixels)
archives.png = png_paused
prepare.main(sys.argv[1:])
"""
_SAYS_WHEN_IT_LOCKS = """
import fcntl, os, sys
lock, signals = fcntl.flock, sys.argv.pop(1)
def flock(file, operation):
  open(os.path.join(signals, 'locking'), 'w').close()
  return lock(file, operation)
fcntl.flock = flock
from mood_jax.data import prepare
prepare.main(sys.argv[1:])
"""


def _wait_for(path, process, timeout_s=120):
  deadline = time.monotonic() + timeout_s
  while not path.exists():
    assert process.poll() is None, f'it ended before {path.name}'
    assert time.monotonic() < deadline, f'{path.name} never came'
    time.sleep(0.05)


def test_two_preparations_at_once_leave_one_whole_dataset(prepared, tmp_path):
  _, manual, _ = prepared
  data_dir = str(tmp_path / 'tfds')
  args = ['cifar10', f'--data_dir={data_dir}', f'--manual_dir={manual}']
  with open(tmp_path / 'first.log', 'w') as first_log, \
      open(tmp_path / 'second.log', 'w') as second_log:
    first = subprocess.Popen([sys.executable, '-c', _PAUSED_MID_WRITE, str(tmp_path), *args],
                             cwd=ROOT, stderr=first_log)
    second = None
    try:
      _wait_for(tmp_path / 'paused', first)
      second = subprocess.Popen([sys.executable, '-c', _SAYS_WHEN_IT_LOCKS, str(tmp_path), *args],
                                cwd=ROOT, stderr=second_log)
      _wait_for(tmp_path / 'locking', second)
      time.sleep(1)  # were it not waiting, it would now be removing the first one's folder
      assert second.poll() is None
      (tmp_path / 'go_on').touch()
      assert first.wait(timeout=120) == 0, (tmp_path / 'first.log').read_text()
      assert second.wait(timeout=120) != 0
    finally:
      for process in (first, second):
        if process and process.poll() is None:
          process.kill()
  assert (tmp_path / 'second.log').read_text().strip().splitlines()[-1] == (
      f'error: cifar10 is already prepared in {data_dir}: datasets are never overwritten '
      '(delete its folder first to prepare it again)')
  assert len(_records('cifar10', 'train', data_dir)) == 5 * 10 * PER_CLASS

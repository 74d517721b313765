"""Builders write ArrayRecord that reads back without TensorFlow; grain splits and batches."""

import collections
import pathlib
import sys

from absl import flags
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mood_jax.data import catalogue, data_config, input_pipeline, transforms
from mood_jax.data.sources import embedded

IMAGE_SIZE = 16
OOD_EXAMPLES = 40


def _config(data_dir, **overrides):
  cfg = data_config.default_data_config()
  cfg.update(dict(data_dir=str(data_dir), image_size=IMAGE_SIZE,
                  ood_examples_per_set=OOD_EXAMPLES, **overrides))
  return cfg


@pytest.fixture(scope='session')
def data_cfg(tmp_path_factory):
  cfg = _config(tmp_path_factory.mktemp('tfds'))
  catalogue.source(cfg).prepare()
  return cfg


def _records(data_cfg, name, config, split, **kwargs):
  return list(tfds.data_source(name, split=split, data_dir=data_cfg.data_dir,
                               builder_kwargs={'config': config}, download=False, **kwargs))


def _digits(data_cfg, split):
  config = embedded.DigitsConfig(image_size=IMAGE_SIZE)
  return _records(data_cfg, 'mood_digits', config, split)


def _all_batches(data_cfg, which, global_batch_size=64):
  ds, count = input_pipeline.eval_dataset(data_cfg, which, global_batch_size=global_batch_size)
  return list(ds), count


def _uint8(images, data_cfg):
  """Undo the normalisation, to compare with stored images."""
  return np.round((images * data_cfg.std + data_cfg.mean) * 255).astype(np.uint8)


def test_builds_array_record_read_back_without_tensorflow(data_cfg):
  digits_dir = f'{data_cfg.data_dir}/mood_digits/{IMAGE_SIZE}px_seed0_test0.3/1.0.0'
  assert pathlib.Path(f'{digits_dir}/mood_digits-train.array_record-00000-of-00001').exists()
  record = _digits(data_cfg, 'train')[0]
  assert record['image'].shape == (IMAGE_SIZE, IMAGE_SIZE, 1)
  assert record['image'].dtype == np.uint8
  assert 'tensorflow' not in sys.modules


def test_digits_split_is_stratified_and_complete(data_cfg):
  train, test = _digits(data_cfg, 'train'), _digits(data_cfg, 'test')
  assert (len(train), len(test)) == (1257, 540)
  assert sorted(r['id'] for r in train + test) == list(range(1797))
  per_class = np.bincount([r['label'] for r in train + test])
  test_per_class = np.bincount([r['label'] for r in test])
  assert np.all(np.abs(test_per_class - 0.3 * per_class) <= 1)


def test_builds_are_deterministic_and_never_redone(data_cfg, tmp_path):
  again = _config(tmp_path)
  catalogue.source(again).prepare()
  for name, config, splits in [
      ('mood_digits', embedded.DigitsConfig(image_size=IMAGE_SIZE), ['train', 'test']),
      ('mood_embedded_ood', embedded.EmbeddedOodConfig(
          image_size=IMAGE_SIZE, examples_per_set=OOD_EXAMPLES),
       embedded.FAR_OOD_SETS + embedded.VALIDATION_OOD_SETS)]:
    for split in splits:
      # Encoded: the PNG bytes themselves must match. (The files' bytes need not: tfds writes
      # each tf.Example's feature map in hash order.)
      first, second = (_records(cfg, name, config, split,
                                decoders={'image': tfds.decode.SkipDecoding()})
                       for cfg in (data_cfg, again))
      assert first == second
  files = list(pathlib.Path(again.data_dir).rglob('*.array_record*'))
  written = {f: f.stat().st_mtime_ns for f in files}
  catalogue.source(again).prepare()
  assert {f: f.stat().st_mtime_ns for f in files} == written


def test_config_names_spell_out_settings():
  assert embedded.DigitsConfig(image_size=32).name == '32px_seed0_test0.3'
  assert embedded.EmbeddedOodConfig(image_size=16, seed=3).name == '16px_seed3_n500'


def test_id_classes_are_filtered_and_remapped_in_sorted_order(data_cfg):
  cfg = _config(data_cfg.data_dir, id_classes=[7, 2, 5])
  assert catalogue.source(cfg).num_classes() == 3
  batches, count = _all_batches(cfg, 'id_test')
  labels = np.concatenate([b['label'][b['valid']] for b in batches])
  stored = collections.Counter(r['label'] for r in _digits(data_cfg, 'test'))
  assert count == len(labels) == stored[2] + stored[5] + stored[7]
  assert collections.Counter(labels.tolist()) == {0: stored[2], 1: stored[5], 2: stored[7]}


def test_all_classes_when_id_classes_empty(data_cfg):
  cfg = _config(data_cfg.data_dir, id_classes=[], ood_sets=['textures'])
  assert catalogue.source(cfg).num_classes() == 10
  assert input_pipeline.eval_dataset(cfg, 'id_train', global_batch_size=8)[1] == 1257


def test_near_ood_is_exactly_the_held_out_test_digits(data_cfg):
  batches, count = _all_batches(data_cfg, 'digits_heldout')
  valid = np.concatenate([b['valid'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])[valid]
  images = _uint8(np.concatenate([b['image'] for b in batches])[valid], data_cfg)
  held_out = [r['image'] for r in _digits(data_cfg, 'test') if r['label'] >= 5]
  assert count == len(held_out) == len(images)
  assert np.all(labels == -1)
  assert sorted(i.tobytes() for i in images) == sorted(i.tobytes() for i in held_out)


def _indices(data_cfg, which):
  """The split indices of every example of `which` the input pipeline reads, in order."""
  examples = input_pipeline._examples(data_cfg, which, with_index=True)
  return np.asarray([examples[i]['index'] for i in range(len(examples))])


def test_id_val_is_a_seeded_stratified_part_of_id_train_that_training_never_reads(data_cfg):
  cfg = _config(data_cfg.data_dir, id_val_fraction=0.2)
  train, val = _indices(cfg, 'id_train'), _indices(cfg, 'id_val')
  assert not set(train) & set(val)  # the training set (train_dataset reads 'id_train')
  # Together, exactly the ID-class rows that training reads without an ID validation split.
  np.testing.assert_array_equal(np.sort(np.r_[train, val]), _indices(data_cfg, 'id_train'))
  stored = np.asarray([r['label'] for r in _digits(data_cfg, 'train')])
  for label in range(5):  # 20% of each class, rounded
    assert (stored[val] == label).sum() == round(0.2 * (stored == label).sum())
  assert set(stored[val]) == set(range(5))
  # The same rows for another source object, run or order of id_classes: a function of
  # split_seed only.
  again = catalogue.source(_config(data_cfg.data_dir, id_val_fraction=0.2,
                                   id_classes=(4, 3, 2, 1, 0)))
  np.testing.assert_array_equal(again.kept_indices('id_val'), val)
  labels = np.concatenate([b['label'][b['valid']] for b in _all_batches(cfg, 'id_val')[0]])
  np.testing.assert_array_equal(labels, stored[val])  # ID labels, as id_test's
  assert catalogue.source(data_cfg).id_sets() == ('id_train', 'id_test')
  with pytest.raises(ValueError, match='data.id_val_fraction > 0'):
    catalogue.source(data_cfg).locate('id_val')


def test_a_held_out_digit_is_a_near_ood_validation_set_apart_from_the_near_test_set(data_cfg):
  cfg = _config(data_cfg.data_dir, heldout_validation_classes=(9,),
                ood_sets=('digits_heldout', 'digits_heldout_val', 'textures'))
  assert catalogue.source(cfg).ood_groups() == {
      'digits_heldout': 'near', 'digits_heldout_val': 'validation', 'textures': 'far'}
  test_labels = np.asarray([r['label'] for r in _digits(data_cfg, 'test')])
  train_labels = np.asarray([r['label'] for r in _digits(data_cfg, 'train')])
  assert set(test_labels[_indices(cfg, 'digits_heldout')]) == {5, 6, 7, 8}
  validation = _indices(cfg, 'digits_heldout_val')  # train images: never a test image
  np.testing.assert_array_equal(validation, np.flatnonzero(train_labels == 9))
  labels = np.concatenate([b['label'][b['valid']]
                           for b in _all_batches(cfg, 'digits_heldout_val')[0]])
  assert np.all(labels == -1)
  with pytest.raises(ValueError, match=r'heldout_validation_classes \[3\] must be .* outside'):
    catalogue.source(_config(data_cfg.data_dir, heldout_validation_classes=(3,))).ood_groups()


@pytest.mark.parametrize('count,global_batch_size,process_count', [
    (11, 4, 2),  # a partial last batch
    (5, 4, 2),   # one process has fewer real examples than a batch
    (8, 8, 1),
    (3, 6, 3),
])
def test_eval_batches_pad_and_cover_each_example_once(count, global_batch_size, process_count):
  examples = grain.MapDataset.range(count).map(
      lambda i: {'image': np.full((2, 2, 1), i + 1, np.float32), 'label': np.int32(i)})
  per_process = [list(input_pipeline.eval_batches(
      examples, global_batch_size=global_batch_size, process_index=index,
      process_count=process_count)) for index in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1
  batches = [b for batches in per_process for b in batches]
  assert all(len(b['label']) == global_batch_size // process_count for b in batches)
  valid = np.concatenate([b['valid'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])
  assert sorted(labels[valid]) == list(range(count))
  assert not labels[~valid].any() and not images[~valid].any()


def test_eval_dataset_counts_each_example_once(data_cfg):
  batches, count = _all_batches(data_cfg, 'photos', global_batch_size=16)
  assert count == OOD_EXAMPLES
  assert len(batches) == -(-OOD_EXAMPLES // 16)
  assert sum(b['valid'].sum() for b in batches) == OOD_EXAMPLES
  assert all(b['label'][b['valid']].tolist() == [-1] * b['valid'].sum() for b in batches)


def test_uniform_noise_images(data_cfg):
  config = embedded.EmbeddedOodConfig(image_size=IMAGE_SIZE, examples_per_set=OOD_EXAMPLES)
  images = np.stack([r['image'] for r in _records(
      data_cfg, 'mood_embedded_ood', config, 'uniform_noise')])
  assert images.shape == (OOD_EXAMPLES, IMAGE_SIZE, IMAGE_SIZE, 1)
  assert images.dtype == np.uint8 and images.min() < 8 and images.max() > 247
  batch = next(iter(input_pipeline.eval_dataset(data_cfg, 'uniform_noise',
                                                global_batch_size=8)[0]))
  assert batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1


def test_train_batches(data_cfg):
  batch = next(iter(input_pipeline.train_dataset(data_cfg, global_batch_size=32, seed=0)))
  assert batch['image'].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 1)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  assert set(batch['label']) <= set(range(5))


def test_train_iterator_restores_to_the_same_batches(data_cfg):
  def train_iter():
    return iter(input_pipeline.train_dataset(data_cfg, global_batch_size=16, seed=3))

  iterator = train_iter()
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  restored = train_iter()
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(3)]):
    np.testing.assert_array_equal(want['image'], got['image'])
    np.testing.assert_array_equal(want['label'], got['label'])


def test_train_reshuffles_each_epoch(data_cfg):
  epoch_batches = 7  # 630 training digits of classes 0-4, in batches of 90
  iterator = iter(input_pipeline.train_dataset(data_cfg, global_batch_size=90, seed=0,
                                               augment=False))
  epochs = [[i.tobytes() for _ in range(epoch_batches) for i in next(iterator)['image']]
            for _ in range(2)]
  assert epochs[0] != epochs[1]
  assert sorted(epochs[0]) == sorted(epochs[1])
  assert len(set(epochs[0])) == 630


def test_train_runs_in_worker_processes(data_cfg):
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which absl.app would parse
  cfg = _config(data_cfg.data_dir, num_workers=1)
  batch = next(iter(input_pipeline.train_dataset(cfg, global_batch_size=8, seed=0)))
  assert batch['image'].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 1)


def test_random_translate_shifts_within_pad():
  image = np.arange(1, 65, dtype=np.uint8).reshape(8, 8, 1)
  translate = transforms.RandomTranslate(pad=2)
  for seed in range(5):
    shifted = translate.random_map({'image': image}, np.random.default_rng(seed))['image']
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    assert any(np.array_equal(shifted, padded[top:top + 8, left:left + 8])
               for top in range(5) for left in range(5))


def test_ood_groups_in_config_order(data_cfg):
  cfg = _config(data_cfg.data_dir, ood_sets=['photos', 'letters', 'digits_heldout'])
  assert catalogue.source(cfg).ood_groups() == {'photos': 'far', 'letters': 'validation',
                                            'digits_heldout': 'near'}


def test_validation_letters_are_digit_like_and_not_a_default_test_set(data_cfg):
  letters = np.stack([r['image'] for r in _records(
      data_cfg, 'mood_embedded_ood',
      embedded.EmbeddedOodConfig(image_size=IMAGE_SIZE, examples_per_set=OOD_EXAMPLES),
      'letters')])
  assert letters.shape == (OOD_EXAMPLES, IMAGE_SIZE, IMAGE_SIZE, 1)
  # Bright strokes on a dark ground, as the digits: the border is darker than the centre.
  border = np.concatenate([letters[:, 0], letters[:, -1], letters[:, :, 0], letters[:, :, -1]])
  assert border.mean() < letters[:, 2:-2, 2:-2].mean()
  assert 'letters' not in data_config.default_data_config().ood_sets


@pytest.mark.parametrize('overrides,call,message', [
    (dict(ood_sets=['textures', 'nope']), lambda cfg: catalogue.source(cfg).ood_groups(),
     r"valid: \[.*'textures'"),
    (dict(id_classes=[]), lambda cfg: catalogue.source(cfg).ood_groups(), 'covers all classes'),
    (dict(id_classes=[3, 11]), lambda cfg: catalogue.source(cfg).num_classes(), r'\[11\]'),
    (dict(name='imagenet'), lambda cfg: catalogue.source(cfg).num_classes(),
     r"valid: \['digits', 'cifar10'"),
    ({}, lambda cfg: input_pipeline.eval_dataset(cfg, 'nope', global_batch_size=8),
     r"valid: \['id_train', 'id_test', 'digits_heldout'"),
])
def test_bad_settings_raise(data_cfg, overrides, call, message):
  with pytest.raises(ValueError, match=message):
    call(_config(data_cfg.data_dir, **overrides))


def test_batch_size_must_divide_over_processes():
  with pytest.raises(ValueError, match='global_batch_size=5 .* process_count=2'):
    input_pipeline.eval_batches(grain.MapDataset.range(4), global_batch_size=5,
                                process_index=0, process_count=2)

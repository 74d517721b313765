"""Read path: TFDS data sources (ArrayRecord, no TensorFlow) -> grain datasets of process batches.

A `data` ConfigDict (see `default_data_config`) picks the in-distribution (ID) classes and the OOD
sets. Batches are dicts of numpy arrays: 'image' float32 [b, S, S, 1] normalised, 'label' int32 [b]
(index among the sorted ID classes; -1 for OOD) and, for evaluation, 'valid' bool [b].
"""

import dataclasses
import os
import time
from collections.abc import Sequence

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mood_jax.data import embedded

NEAR_OOD_SETS = ('digits_heldout',)
FAR_OOD_SETS = embedded.FAR_OOD_SETS
VALIDATION_OOD_SETS = embedded.VALIDATION_OOD_SETS  # hyperparameter choice only
OOD_SETS = NEAR_OOD_SETS + FAR_OOD_SETS + VALIDATION_OOD_SETS
_ID_SPLITS = {'id_train': 'train', 'id_test': 'test'}
_DATASET_NAMES = ('digits',)


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='digits',
      data_dir='~/.cache/mood_jax/tensorflow_datasets',
      image_size=24,  # digits are 8x8; with 4 px patches, 24 px gives 36 tokens
      # Tuples, not lists: ml_collections can override only tuples from the command line.
      id_classes=(0, 1, 2, 3, 4),  # empty or None: all classes
      ood_sets=NEAR_OOD_SETS + FAR_OOD_SETS,  # the test sets
      mean=0.5,
      std=0.5,
      test_fraction=0.3,
      split_seed=0,
      ood_examples_per_set=500,
      num_workers=0,  # 0: in-process; more: grain worker processes
  ))


# --- Which TFDS dataset, config and split holds what. ---

def _data_dir(data_cfg) -> str:
  return os.path.expanduser(data_cfg.data_dir)


def _check_name(data_cfg) -> None:
  if data_cfg.name not in _DATASET_NAMES:
    raise ValueError(f'unknown data.name {data_cfg.name!r}; valid: {list(_DATASET_NAMES)}')


def _id_dataset(data_cfg) -> tuple[str, tfds.core.BuilderConfig]:
  _check_name(data_cfg)
  return 'mood_digits', embedded.DigitsConfig(
      image_size=data_cfg.image_size, test_fraction=data_cfg.test_fraction,
      split_seed=data_cfg.split_seed)


def _far_ood_dataset(data_cfg) -> tuple[str, tfds.core.BuilderConfig]:
  # The builder's own seed, not split_seed: OOD sets stay fixed while ID splits vary.
  return 'mood_embedded_ood', embedded.EmbeddedOodConfig(
      image_size=data_cfg.image_size, examples_per_set=data_cfg.ood_examples_per_set)


def _location(data_cfg, which: str) -> tuple[str, tfds.core.BuilderConfig, str]:
  """(TFDS name, builder config, split) that hold `which`."""
  if which in _ID_SPLITS:
    return *_id_dataset(data_cfg), _ID_SPLITS[which]
  if which not in OOD_SETS:
    raise ValueError(f'unknown eval set {which!r}; valid: {list(_ID_SPLITS) + list(OOD_SETS)}')
  _check_ood_set(data_cfg, which)
  if which in NEAR_OOD_SETS:
    return *_id_dataset(data_cfg), 'test'
  return *_far_ood_dataset(data_cfg), which


def _data_source(data_cfg, which: str, **kwargs) -> Sequence[dict]:
  name, config, split = _location(data_cfg, which)
  # download=False: reading never writes; `prepare` does.
  return tfds.data_source(name, split=split, data_dir=_data_dir(data_cfg), download=False,
                          builder_kwargs={'config': config}, **kwargs)


# --- Classes and OOD sets. ---

def _all_classes(data_cfg) -> range:
  _check_name(data_cfg)
  return range(embedded.NUM_DIGIT_CLASSES)


def _id_classes(data_cfg) -> tuple[int, ...]:
  """Sorted ID classes: the ones asked for, or all of them."""
  all_classes = _all_classes(data_cfg)
  if not data_cfg.id_classes:
    return tuple(all_classes)
  unknown = set(data_cfg.id_classes) - set(all_classes)
  if unknown:
    raise ValueError(f'id_classes {sorted(unknown)} are not among the classes {list(all_classes)}')
  return tuple(sorted(set(data_cfg.id_classes)))


def num_classes(data_cfg) -> int:
  return len(_id_classes(data_cfg))


def num_channels(data_cfg) -> int:
  _check_name(data_cfg)
  return 1  # the embedded sets are grayscale


def _check_ood_set(data_cfg, name: str) -> None:
  if name not in OOD_SETS:
    raise ValueError(f'unknown OOD set {name!r}; valid: {list(OOD_SETS)}')
  if name in NEAR_OOD_SETS and len(_id_classes(data_cfg)) == len(_all_classes(data_cfg)):
    raise ValueError(f'{name!r} is the test digits of classes outside id_classes, but id_classes '
                     'covers all classes: choose a subset, or drop it from ood_sets')


def ood_group(name: str) -> str:
  if name in NEAR_OOD_SETS:
    return 'near'
  return 'validation' if name in VALIDATION_OOD_SETS else 'far'


def ood_groups(data_cfg) -> dict[str, str]:
  """OOD set name -> 'near' | 'far' | 'validation', in config order."""
  for name in data_cfg.ood_sets:
    _check_ood_set(data_cfg, name)
  return {name: ood_group(name) for name in data_cfg.ood_sets}


def prepare(data_cfg) -> None:
  """Builds whichever needed TFDS datasets are not on disk yet; never touches existing ones."""
  datasets = [_id_dataset(data_cfg)]
  if set(ood_groups(data_cfg).values()) - {'near'}:  # far and validation sets
    datasets.append(_far_ood_dataset(data_cfg))
  for name, config in datasets:
    # ArrayRecord: random access, which grain needs and TFRecord lacks.
    builder = tfds.builder(name, config=config, data_dir=_data_dir(data_cfg),
                           file_format='array_record')
    if builder.is_prepared():
      logging.info('Found %s in %s', builder.info.full_name, builder.data_dir)
      continue
    start = time.perf_counter()
    builder.download_and_prepare()
    logging.info('Built %s in %s (%.1f s)', builder.info.full_name, builder.data_dir,
                 time.perf_counter() - start)


# --- Transforms: picklable classes, so that grain worker processes can run them. ---

@dataclasses.dataclass(frozen=True)
class _Read(grain.transforms.Map):
  source: Sequence[dict]

  def map(self, index):
    return self.source[index]


@dataclasses.dataclass(frozen=True)
class ToIdLabel(grain.transforms.Map):
  """Keeps image and label; the label becomes its index among `id_classes`, or -1 (OOD)."""
  id_classes: tuple[int, ...]

  def map(self, record):
    label = int(record['label'])
    index = self.id_classes.index(label) if label in self.id_classes else -1
    return {'image': record['image'], 'label': np.int32(index)}


@dataclasses.dataclass(frozen=True)
class RandomTranslate(grain.transforms.RandomMap):
  """Shifts by up to `pad` pixels each way: zero-pad, then crop the original size back out.

  Zeros are the digits' background; no flips, as digits are not mirror-symmetric.
  """
  pad: int

  def random_map(self, example, rng: np.random.Generator):
    image = example['image']
    height, width = image.shape[:2]
    padded = np.pad(image, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)))
    top, left = rng.integers(0, 2 * self.pad + 1, size=2)
    return {**example, 'image': padded[top:top + height, left:left + width]}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """uint8 image -> float32 (x / 255 - mean) / std."""
  mean: float
  std: float

  def map(self, example):
    image = example['image'].astype(np.float32) / 255
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    return {**example, 'image': (image - mean) / std}


# --- Datasets. ---

def _kept_labels(data_cfg, which: str) -> set[int] | None:
  """Source labels that `which` keeps from its split; None keeps every record."""
  id_classes, all_classes = set(_id_classes(data_cfg)), set(_all_classes(data_cfg))
  if which in NEAR_OOD_SETS:
    return all_classes - id_classes
  if which in _ID_SPLITS and id_classes != all_classes:
    return id_classes
  return None


def _examples(data_cfg, which: str) -> grain.MapDataset:
  """`which` as {'image': uint8 [S, S, 1], 'label': int32 ID class index or -1}."""
  source = _data_source(data_cfg, which)
  kept = _kept_labels(data_cfg, which)
  if kept is None:
    records = grain.MapDataset.source(source)
  else:
    # Images stay encoded while labels are scanned: decoding would dominate on large sets.
    labels = _data_source(data_cfg, which, decoders={'image': tfds.decode.SkipDecoding()})
    indices = [i for i in range(len(labels)) if labels[i]['label'] in kept]
    records = grain.MapDataset.source(indices).map(_Read(source))
  return records.map(ToIdLabel(_id_classes(data_cfg)))


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} does not divide over '
                     f'process_count={process_count} processes')
  return global_batch_size // process_count


def _batched(ds: grain.MapDataset, batch_size: int, *,
             drop_remainder: bool = False) -> grain.IterDataset:
  # Batching after `to_iter_dataset` keeps its read-ahead buffer in examples, not batches.
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder)


def _in_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if not num_workers:
    return ds
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def train_dataset(data_cfg, *, global_batch_size: int, seed: int,
                  augment: bool = True) -> grain.IterDataset:
  """Endless ID training batches for this process, reshuffled every epoch.

  `iter()` of it is checkpointable with grain (`get_state` / `set_state`).
  """
  local_batch_size = _local_batch_size(global_batch_size, jax.process_count())
  ds = _examples(data_cfg, 'id_train')[jax.process_index()::jax.process_count()]
  # `seed` derives distinct seeds for the shuffle and the augmentation.
  ds = ds.seed(seed).shuffle().repeat()
  if augment:
    # 2 px at 32 px, in proportion at other sizes.
    ds = ds.random_map(RandomTranslate(pad=max(1, round(data_cfg.image_size / 16))))
  ds = ds.map(Normalize(data_cfg.mean, data_cfg.std))
  return _in_workers(_batched(ds, local_batch_size, drop_remainder=True), data_cfg.num_workers)


class _PadInvalid(grain.MapDataset):
  """`parent` with 'valid'=True, extended to `length` with all-zero examples with 'valid'=False."""

  def __init__(self, parent: grain.MapDataset, length: int):
    super().__init__(parent)
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index < len(self._parent):
      return {**self._parent[index], 'valid': True}
    return {**jax.tree.map(np.zeros_like, self._parent[0]), 'valid': False}


def eval_batches(examples: grain.MapDataset, *, global_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """This process's batches of `examples`, each example in exactly one process's batches.

  Padding to a whole number of global batches before taking every `process_count`-th example
  gives every process the same number of full batches, as collectives over them need.
  Process index and count default to JAX's.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  padded_length = -(-len(examples) // global_batch_size) * global_batch_size
  shard = _PadInvalid(examples, padded_length)[process_index::process_count]
  return _batched(shard, local_batch_size)


def eval_dataset(data_cfg, which: str, *,
                 global_batch_size: int) -> tuple[grain.IterDataset, int]:
  """Batches of 'id_train', 'id_test' or an OOD set, and the number of real examples in it."""
  examples = _examples(data_cfg, which).map(Normalize(data_cfg.mean, data_cfg.std))
  batches = eval_batches(examples, global_batch_size=global_batch_size)
  return _in_workers(batches, data_cfg.num_workers), len(examples)

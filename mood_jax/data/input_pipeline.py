"""Read path: TFDS data sources (ArrayRecord, no TensorFlow) -> grain datasets of process batches.

A `data` ConfigDict (see `default_data_config`) picks the dataset (`name`: the embedded 'digits',
or a real one in `sources`), the in-distribution (ID) classes and the OOD sets. Batches are dicts
of numpy arrays: 'image' float32 [b, S, S, C] normalised, 'label' int32 [b] (index among the
sorted ID classes; -1 for OOD) and, for evaluation, 'valid' bool [b].
"""

import dataclasses
import math
import os
import time
from collections.abc import Sequence

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mood_jax import checkpoint, config_checks
from mood_jax.data import build_lock, embedded, folder, sources
from mood_jax.data.randaugment import RandAugment
from mood_jax.data.transforms import (ColorJitter, Decode, Normalize, RandomErasing,
                                      RandomResizedCrop, RandomTranslate, ResizeCenterCrop)
from mood_jax.errors import UserError

NEAR_OOD_SETS = ('digits_heldout',)
FAR_OOD_SETS = embedded.FAR_OOD_SETS
VALIDATION_OOD_SETS = embedded.VALIDATION_OOD_SETS  # hyperparameter choice only
OOD_SETS = NEAR_OOD_SETS + FAR_OOD_SETS + VALIDATION_OOD_SETS
_ID_SPLITS = {'id_train': 'train', 'id_test': 'test'}
_EMBEDDED = 'digits'
_DATASET_NAMES = (_EMBEDDED, *sources.ID_DATASETS)


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
      # Real datasets only (data.name other than 'digits'):
      label_key='label',       # the label feature: CIFAR-100's 'coarse_label' has 20 superclasses
      validation_ood_sets=(),  # those of ood_sets that choose hparams (evaluate.sweep)
      crop_scale=(0.08, 1.0),  # train RandomResizedCrop area range (BEiT/timm default)
      hflip=0.5,               # train horizontal flip probability
      randaugment_ops=0,       # train RandAugment operations per image; 0: off (BEiT: 2)
      randaugment_magnitude=9.0,  # of 10 (BEiT fine-tune: 'rand-m9-mstd0.5-inc1')
      random_erasing=0.0,      # train random-erasing probability (BEiT fine-tune: 0.25)
      color_jitter=0.0,        # augment='crop' only: ColorJitter strength (BEiT pretraining: 0.4)
      eval_crop_fraction=0.875,  # eval: shorter side to image_size / this, centre crop
      # True: the classifier has a logit for every class of the dataset and ID labels keep
      # their index, so one ID class can be fine-tuned (MOOD's one-class fine-tune keeps the
      # dataset's head: MOODv1/datasets.py build_dataset with --class_idx).
      head_all_classes=False,
  ))


def check_config(data_cfg) -> None:
  """`config.data`'s ranges; the dataset, class and OOD set names are checked where they
  are looked up (`ood_groups`, `num_classes`)."""
  config_checks.at_least('data.image_size', data_cfg.image_size, 1, 24)
  config_checks.inside('data.std', data_cfg.std, 0, math.inf, 0.5)
  config_checks.at_least('data.ood_examples_per_set', data_cfg.ood_examples_per_set, 1, 500)
  config_checks.at_least('data.num_workers', data_cfg.num_workers, 0, 0)
  config_checks.inside('data.test_fraction', data_cfg.test_fraction, 0, 1, 0.3)
  config_checks.inside('data.eval_crop_fraction', data_cfg.eval_crop_fraction, 0, 1, 0.875,
                       closed='high')
  for name, example in (('hflip', 0.5), ('random_erasing', 0.25)):
    config_checks.inside(f'data.{name}', data_cfg[name], 0, 1, example, closed='both')
  config_checks.at_least('data.randaugment_ops', data_cfg.randaugment_ops, 0, 2)
  config_checks.inside('data.randaugment_magnitude', data_cfg.randaugment_magnitude, 0, 10,
                       9.0, closed='both')
  low, high = (tuple(data_cfg.crop_scale) + (None, None))[:2]
  if len(data_cfg.crop_scale) != 2 or not 0 < low <= high <= 1:
    config_checks.fail('data.crop_scale', tuple(data_cfg.crop_scale),
                       'must be (low, high) with 0 < low <= high <= 1', "'(0.08,1.0)'")


# --- Which TFDS dataset, config and split holds what. ---

def _data_dir(data_cfg) -> str:
  return os.path.expanduser(data_cfg.data_dir)


def _check_name(data_cfg) -> None:
  if data_cfg.name not in _DATASET_NAMES and not data_cfg.name.startswith(folder.PREFIX):
    raise ValueError(f'unknown data.name {data_cfg.name!r}; valid: {list(_DATASET_NAMES)} or '
                     f'{folder.PREFIX}NAME (a labelled image folder built by '
                     '`python -m mood_jax.data.folder --labelled`)')


def _is_folder(name: str) -> bool:
  return name.startswith(folder.PREFIX)


def _embedded(data_cfg) -> bool:
  _check_name(data_cfg)
  return data_cfg.name == _EMBEDDED


def _id_dataset(data_cfg) -> tuple[str, tfds.core.BuilderConfig]:
  _check_name(data_cfg)
  return 'mood_digits', embedded.DigitsConfig(
      image_size=data_cfg.image_size, test_fraction=data_cfg.test_fraction,
      split_seed=data_cfg.split_seed)


def _far_ood_dataset(data_cfg) -> tuple[str, tfds.core.BuilderConfig]:
  # The builder's own seed, not split_seed: OOD sets stay fixed while ID splits vary.
  return 'mood_embedded_ood', embedded.EmbeddedOodConfig(
      image_size=data_cfg.image_size, examples_per_set=data_cfg.ood_examples_per_set)


def _location(data_cfg, which: str) -> tuple[str, tfds.core.BuilderConfig | None, str]:
  """(TFDS name, builder config or None, split) that hold `which`."""
  if not _embedded(data_cfg):
    if which not in _ID_SPLITS:
      _check_ood_set(data_cfg, which)
    return sources.location(data_cfg.name, which)
  if which in _ID_SPLITS:
    return *_id_dataset(data_cfg), _ID_SPLITS[which]
  if which not in OOD_SETS and not _is_folder(which):
    raise ValueError(f'unknown eval set {which!r}; valid: {list(_ID_SPLITS) + list(OOD_SETS)}')
  _check_ood_set(data_cfg, which)
  if _is_folder(which):
    return sources.ood_location(data_cfg.name, which)
  if which in NEAR_OOD_SETS:
    return *_id_dataset(data_cfg), 'test'
  return *_far_ood_dataset(data_cfg), which


class _ReportDamage(Sequence):
  """A TFDS data source whose unreadable records (a damaged or truncated file) raise a
  UserError naming the set, the record and the directory to rebuild, not array_record's or
  PIL's error, which name neither."""

  def __init__(self, source, which: str, rebuild: str):
    self._source, self._which, self._rebuild = source, which, rebuild

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    try:
      return self._source[index]
    except Exception as e:  # array_record, riegeli and PIL raise many types
      directory = self._source.dataset_info.data_dir
      raise UserError(f'{self._which}: record {index} in {directory} cannot be read '
                      f'({checkpoint.error_line(e)}): its files are damaged. Move {directory} '
                      f'aside and {self._rebuild}') from None


def _encoded(data_cfg, which: str) -> bool:
  """Stored as image files' bytes (real datasets, folders), decoded by `transforms.Decode`."""
  return not _embedded(data_cfg) or _is_folder(which)


def _data_source(data_cfg, which: str, **kwargs) -> Sequence[dict]:
  name, config, split = _location(data_cfg, which)
  if _encoded(data_cfg, which):  # images stay encoded: `transforms.Decode` reads them
    kwargs = dict(kwargs, decoders={'image': tfds.decode.SkipDecoding()})
  # download=False: reading never writes; `prepare` does.
  source = tfds.data_source(name, split=split, data_dir=_data_dir(data_cfg), download=False,
                            builder_kwargs={'config': config} if config else {}, **kwargs)
  return _ReportDamage(source, which, 'rerun: it is rebuilt' if _embedded(data_cfg) else
                       'prepare it again (README, "Real datasets")')


# --- Classes and OOD sets. ---

def _label_key(data_cfg) -> str:
  return 'label' if _embedded(data_cfg) else data_cfg.label_key


def _label_feature(data_cfg) -> tfds.features.ClassLabel:
  if _is_folder(data_cfg.name):  # its classes are in the dataset, not in a builder's code
    return tfds.features.ClassLabel(names=folder.class_names(
        data_cfg.name[len(folder.PREFIX):], _data_dir(data_cfg)))
  features = sources.features(data_cfg.name)
  feature = features[data_cfg.label_key] if data_cfg.label_key in features else None
  if not isinstance(feature, tfds.features.ClassLabel):
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    raise ValueError(f'data.label_key={data_cfg.label_key!r} is not a class label of '
                     f'{data_cfg.name}: valid: {labels}')
  return feature


def _all_classes(data_cfg) -> range:
  if _embedded(data_cfg):
    return range(embedded.NUM_DIGIT_CLASSES)
  return range(_label_feature(data_cfg).num_classes)


def _class_index(data_cfg, label: int | str) -> int | str:
  """A class given by index, or for real datasets by TFDS label name (e.g. ImageNet's wnid)."""
  if isinstance(label, str) and not _embedded(data_cfg):
    names = _label_feature(data_cfg).names
    return names.index(label) if label in names else label
  return label


def all_classes(data_cfg) -> tuple[int, ...]:
  """Every class of the ID dataset, as indices (whatever data.id_classes selects)."""
  return tuple(_all_classes(data_cfg))


def _id_classes(data_cfg) -> tuple[int, ...]:
  """Sorted ID classes: the ones asked for, or all of them."""
  all_classes = _all_classes(data_cfg)
  if not data_cfg.id_classes:
    return tuple(all_classes)
  asked = {_class_index(data_cfg, c) for c in data_cfg.id_classes}
  unknown = asked - set(all_classes)
  if unknown:
    names = '' if _embedded(data_cfg) else ', or their TFDS label names'
    raise ValueError(f'id_classes {sorted(unknown, key=str)} are not among the classes of '
                     f'{data_cfg.name} (0..{len(all_classes) - 1}{names})')
  return tuple(sorted(asked))


def _head_classes(data_cfg) -> tuple[int, ...]:
  """The classes the classifier has a logit for, in logit order."""
  return tuple(_all_classes(data_cfg)) if data_cfg.head_all_classes else _id_classes(data_cfg)


def num_classes(data_cfg) -> int:
  return len(_head_classes(data_cfg))


def num_channels(data_cfg) -> int:
  return 1 if _embedded(data_cfg) else 3  # the embedded sets are grayscale; `Decode` makes RGB


def _heldout_set(data_cfg) -> str:
  return NEAR_OOD_SETS[0] if _embedded(data_cfg) else sources.heldout_set(data_cfg.name)


def _check_ood_set(data_cfg, name: str) -> None:
  if not _embedded(data_cfg):
    if name != _heldout_set(data_cfg):
      sources.ood_location(data_cfg.name, name)
  elif name not in OOD_SETS and not _is_folder(name):
    raise ValueError(f'unknown OOD set {name!r}; valid: {list(OOD_SETS)} or {folder.PREFIX}NAME '
                     '(an image folder built by `python -m mood_jax.data.folder`)')
  if name == _heldout_set(data_cfg) and len(_id_classes(data_cfg)) == len(_all_classes(data_cfg)):
    raise ValueError(f'{name!r} is the test images of classes outside id_classes, but '
                     'id_classes covers all classes: choose a subset, or drop it from ood_sets')


def ood_group(name: str) -> str:
  if name in NEAR_OOD_SETS:
    return 'near'
  return 'validation' if name in VALIDATION_OOD_SETS else 'far'


def ood_groups(data_cfg) -> dict[str, str]:
  """OOD set name -> 'near' | 'far' | 'validation', in config order."""
  for name in data_cfg.ood_sets:
    _check_ood_set(data_cfg, name)
  if _embedded(data_cfg):
    return {name: ood_group(name) for name in data_cfg.ood_sets}
  validation = data_cfg.get('validation_ood_sets') or ()
  stray = set(validation) - set(data_cfg.ood_sets)
  if stray:
    raise ValueError(f'data.validation_ood_sets {sorted(stray)} are not in data.ood_sets: '
                     'add them there too')
  return {name: sources.ood_group(data_cfg.name, name, validation) for name in data_cfg.ood_sets}


def _check_prepared(data_cfg) -> None:
  """Real datasets are never downloaded here: each must be in data_dir as ArrayRecord already."""
  for which in dict.fromkeys(('id_train', 'id_test', *data_cfg.ood_sets)):
    _check_prepared_set(data_cfg, which)


def _check_prepared_set(data_cfg, which: str) -> None:
  """UserError unless the dataset that holds `which` is in data_dir, as ArrayRecord."""
  data_dir = _data_dir(data_cfg)
  name, config, _ = _location(data_cfg, which)
  builder = (folder.builder(config.name, data_dir) if config else
             tfds.builder(name, data_dir=data_dir, file_format='array_record'))
  labelled = config is not None and which in _ID_SPLITS  # data.name='folder:NAME'
  what = f'{folder.PREFIX}{config.name}' if labelled else which if config else name
  if not builder.is_prepared():
    command = (f'`{folder.prepare_command(config.name, data_dir, labelled=True)}`' if labelled
               else sources.prepare_command(what, data_dir))
    raise UserError(f'{what} is not prepared in {data_dir}: run {command}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise UserError(
        f'{what} in {builder.data_dir} is {builder.info.file_format.value}, which grain cannot '
        f'read: prepare it in another data dir with {sources.prepare_command(what, "DIR")}')


def prepare(data_cfg) -> None:
  """Builds whichever needed TFDS datasets are not on disk yet; never touches existing ones.

  Real datasets are only checked: building them needs their source files (UserError if absent).
  """
  if not _embedded(data_cfg):
    _check_prepared(data_cfg)
    return
  for name in data_cfg.ood_sets:  # image folders are built by `mood_jax.data.folder` only
    if _is_folder(name):
      _check_prepared_set(data_cfg, name)
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
    with build_lock.held(os.path.dirname(builder.data_dir)):
      if builder.is_prepared():  # by the run that held the lock
        continue
      start = time.perf_counter()
      builder.download_and_prepare()
      logging.info('Built %s in %s (%.1f s)', builder.info.full_name, builder.data_dir,
                   time.perf_counter() - start)


# --- Record-level maps (image transforms are in `transforms`). ---

@dataclasses.dataclass(frozen=True)
class _Read(grain.transforms.Map):
  """Record `index` of `source`; with `with_index`, the index too (the example's id)."""
  source: Sequence[dict]
  with_index: bool = False

  def map(self, index):
    return {**self.source[index], 'index': index} if self.with_index else self.source[index]


@dataclasses.dataclass(frozen=True)
class ToIdLabel(grain.transforms.Map):
  """Keeps image, label (from feature `key`) and the split index if there is one; an ID
  label becomes its index among `head_classes` (default: `id_classes`), any other -1 (OOD)."""
  id_classes: tuple[int, ...]
  key: str = 'label'
  head_classes: tuple[int, ...] = ()

  def map(self, record):
    label = int(record[self.key])
    index = (self.head_classes or self.id_classes).index(label) if (
        label in self.id_classes) else -1
    split_index = {'index': np.int32(record['index'])} if 'index' in record else {}
    return {'image': record['image'], 'label': np.int32(index), **split_index}


# --- Datasets. ---

def _kept_labels(data_cfg, which: str) -> set[int] | None:
  """Source labels that `which` keeps from its split; None keeps every record."""
  id_classes, all_classes = set(_id_classes(data_cfg)), set(_all_classes(data_cfg))
  if which == _heldout_set(data_cfg):
    return all_classes - id_classes
  if which in _ID_SPLITS and id_classes != all_classes:
    return id_classes
  return None


# (data dir, TFDS name, config name, split, size, kept labels) -> indices: each stage and model
# reads the ID splits again, and a scan of ImageNet's labels reads all of its 140 GB.
_SCANNED: dict[tuple, list[int]] = {}


def _kept_indices(data_cfg, which: str, kept: set[int]) -> list[int]:
  """Indices of the records of `which`'s split whose label is in `kept`."""
  # Images stay encoded while labels are scanned: decoding would dominate on large sets.
  labels = _data_source(data_cfg, which, decoders={'image': tfds.decode.SkipDecoding()})
  name, config, split = _location(data_cfg, which)
  key = (_data_dir(data_cfg), name, config and config.name, split, len(labels),
         _label_key(data_cfg), frozenset(kept))
  if key not in _SCANNED:
    label_key = _label_key(data_cfg)
    _SCANNED[key] = [i for i in range(len(labels)) if int(labels[i][label_key]) in kept]
  return _SCANNED[key]


def _has_id_labels(data_cfg, which: str) -> bool:
  """Whether `which` comes from the ID dataset, whose labels are ID classes or held-out ones."""
  return _embedded(data_cfg) or which in _ID_SPLITS or which == _heldout_set(data_cfg)


def _examples(data_cfg, which: str, *, with_index: bool = False) -> grain.MapDataset:
  """`which` as {'image': uint8 [H, W, C], 'label': int32 ID class index or -1}, and with
  `with_index` 'index': int32 the example's index in its TFDS split."""
  source = _data_source(data_cfg, which)
  kept = _kept_labels(data_cfg, which)
  if kept is None and not with_index:
    records = grain.MapDataset.source(source)
  else:
    indices = range(len(source)) if kept is None else _kept_indices(data_cfg, which, kept)
    records = grain.MapDataset.source(indices).map(_Read(source, with_index))
  if not len(records):
    raise UserError(f'{which} of {data_cfg.name} has no examples: check data.id_classes and '
                    f'the dataset in {_data_dir(data_cfg)}')
  if _has_id_labels(data_cfg, which):
    records = records.map(ToIdLabel(_id_classes(data_cfg), _label_key(data_cfg),
                                    _head_classes(data_cfg)))
  else:  # another dataset's labels mean nothing here: all of its examples are OOD (-1)
    records = records.map(ToIdLabel(()))
  if not _encoded(data_cfg, which):  # tfds decodes these
    return records
  name, _, split = _location(data_cfg, which)
  records = records.map_with_index(Decode(f'{which} ({name}, split {split})',
                                          num_channels(data_cfg)))
  if _embedded(data_cfg):  # a folder beside sets made at image_size: the detector's rule
    records = records.map(ResizeCenterCrop(data_cfg.image_size, 1.0))
  return records


def eval_transforms(data_cfg) -> list[grain.transforms.Map]:
  """Same for ID and OOD: resize and centre crop (real datasets), normalise."""
  resize = [] if _embedded(data_cfg) else [
      ResizeCenterCrop(data_cfg.image_size, data_cfg.eval_crop_fraction)]
  return [*resize, Normalize(data_cfg.mean, data_cfg.std)]


AUGMENT_CHOICES = (True, False, 'crop')


def train_transforms(data_cfg, augment: bool | str = True) -> list[grain.transforms.Map |
                                                                    grain.transforms.RandomMap]:
  """augment: True, all configured augmentations; 'crop', colour jitter (data.color_jitter),
  random crop and flip (MIM pretraining, as BEiT's); False, the eval transforms."""
  if not augment:
    return eval_transforms(data_cfg)
  normalize = Normalize(data_cfg.mean, data_cfg.std)
  if _embedded(data_cfg):
    # 2 px at 32 px, in proportion at other sizes.
    return [RandomTranslate(pad=max(1, round(data_cfg.image_size / 16))), normalize]
  full = augment is True
  jitter = augment == 'crop' and data_cfg.color_jitter
  return [*([ColorJitter(data_cfg.color_jitter)] if jitter else []),
          RandomResizedCrop(data_cfg.image_size, tuple(data_cfg.crop_scale), flip=data_cfg.hflip),
          *([RandAugment(data_cfg.randaugment_ops, data_cfg.randaugment_magnitude)]
            if full and data_cfg.randaugment_ops else []),
          normalize,
          *([RandomErasing(data_cfg.random_erasing)] if full and data_cfg.random_erasing else [])]


def apply(ds: grain.MapDataset, ops) -> grain.MapDataset:
  """`ds` with each of `ops` in turn; random ones draw from the dataset's seed."""
  for op in ops:
    ds = ds.random_map(op) if isinstance(op, grain.transforms.RandomMap) else ds.map(op)
  return ds


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
                  augment: bool | str = True) -> grain.IterDataset:
  """Endless ID training batches for this process, reshuffled every epoch.

  `iter()` of it is checkpointable with grain (`get_state` / `set_state`).
  """
  local_batch_size = _local_batch_size(global_batch_size, jax.process_count())
  ds = _examples(data_cfg, 'id_train')[jax.process_index()::jax.process_count()]
  # `seed` derives distinct seeds for the shuffle and the augmentation.
  ds = apply(ds.seed(seed).shuffle().repeat(), train_transforms(data_cfg, augment))
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


def eval_dataset(data_cfg, which: str, *, global_batch_size: int, augment: bool | str = False,
                 seed: int = 0) -> tuple[grain.IterDataset, int]:
  """Batches of 'id_train', 'id_test' or an OOD set (with each example's split 'index'), and
  the number of real examples in it: each example once, in order, with the eval transforms
  or, if `augment`, one draw of the training ones (`train_transforms`; MOOD's ID-train
  feature bank)."""
  ops = train_transforms(data_cfg, augment) if augment else eval_transforms(data_cfg)
  examples = apply(_examples(data_cfg, which, with_index=True).seed(seed), ops)
  batches = eval_batches(examples, global_batch_size=global_batch_size)
  return _in_workers(batches, data_cfg.num_workers), len(examples)


def example_ids(data_cfg, which: str, indices) -> np.ndarray:
  """Each example's id, from its split `indices`: its file name (relative to the source
  folder) in an image folder, else the index itself."""
  _, config, split = _location(data_cfg, which)
  names = (folder.file_names(config.name, _data_dir(data_cfg), split)
           if isinstance(config, folder.FolderConfig) else None)
  return np.asarray([names[i] for i in indices]) if names else np.asarray(indices)

"""Read path: a source's TFDS splits (ArrayRecord, no TensorFlow) -> grain datasets of batches.

`catalogue.source(config.data)` says where each split and OOD set is and which of its records and
labels count; here they become examples, go through the transforms and are batched per process.
Batches are dicts of numpy arrays: 'image' float32 [b, S, S, C] normalised, 'label' int32 [b]
(index among the sorted ID classes; -1 for OOD) and, for evaluation, 'valid' bool [b].
"""

import dataclasses
from collections.abc import Sequence

import grain
import jax
import numpy as np

from mood_jax.data import catalogue
from mood_jax.data.randaugment import RandAugment
from mood_jax.data.transforms import (ColorJitter, Decode, Normalize, RandomErasing,
                                      RandomResizedCrop, RandomTranslate, ResizeCenterCrop,
                                      ToNativeSize)
from mood_jax.errors import UserError


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

def _examples(data_cfg, which: str, *, with_index: bool = False) -> grain.MapDataset:
  """`which` as {'image': uint8 [H, W, C], 'label': int32 ID class index or -1}, and with
  `with_index` 'index': int32 the example's index in its TFDS split."""
  source = catalogue.source(data_cfg)
  location = source.locate(which)
  stored = location.read(source.data_dir, which)
  kept = source.kept_indices(which)
  if kept is None and not with_index:
    records = grain.MapDataset.source(stored)
  else:
    records = grain.MapDataset.source(range(len(stored)) if kept is None else kept).map(
        _Read(stored, with_index))
  if not len(records):
    raise UserError(f'{which} of {data_cfg.name} has no examples: check data.id_classes and '
                    f'the dataset in {source.data_dir}')
  if source.has_id_labels(which):
    records = records.map(ToIdLabel(source.id_classes(), source.label_key,
                                    source.head_classes()))
  else:  # another dataset's labels mean nothing here: all of its examples are OOD (-1)
    records = records.map(ToIdLabel(()))
  if not location.encoded:  # tfds decodes these
    return records
  records = records.map_with_index(Decode(f'{which} ({location.dataset}, split {location.split})',
                                          source.channels))
  if source.fixed_size:  # e.g. a folder beside sets made at image_size: the detector's rule
    records = records.map(ResizeCenterCrop(data_cfg.image_size, 1.0))
  elif data_cfg.native_size:
    records = records.map(ToNativeSize(data_cfg.native_size))
  return records


def stored_images(data_cfg, which: str, indices) -> list[np.ndarray]:
  """uint8 [H, W, C] images of `which`'s records at split `indices` (the 'index' that
  `with_index` gives), as stored, before any transform: what a person looks at (report's
  image grids). A list: an image folder's sizes differ."""
  source = catalogue.source(data_cfg)
  location = source.locate(which)
  stored = location.read(source.data_dir, which)
  decode = Decode(f'{which} ({location.dataset}, split {location.split})', source.channels)
  images = []
  for index in map(int, indices):
    record = {'image': stored[index]['image']}
    images.append(decode.map_with_index(index, record)['image'] if location.encoded else
                  record['image'])
  return images


def eval_transforms(data_cfg) -> list[grain.transforms.Map]:
  """Same for ID and OOD: resize and centre crop (unless stored at image_size), normalise."""
  resize = [] if catalogue.source(data_cfg).fixed_size else [
      ResizeCenterCrop(data_cfg.image_size, data_cfg.eval_crop_fraction)]
  return [*resize, Normalize(data_cfg.mean, data_cfg.std)]


def train_transforms(data_cfg, augment: bool | str = True) -> list[grain.transforms.Map |
                                                                    grain.transforms.RandomMap]:
  """augment (`data_config.AUGMENT_CHOICES`): True, all configured augmentations; 'crop',
  colour jitter (data.color_jitter), random crop and flip (MIM pretraining, as BEiT's); False,
  the eval transforms. Images stored at image_size (the digits) are translated instead."""
  if not augment:
    return eval_transforms(data_cfg)
  normalize = Normalize(data_cfg.mean, data_cfg.std)
  if catalogue.source(data_cfg).fixed_size:
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

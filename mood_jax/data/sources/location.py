"""A stored TFDS split that holds an ID split or OOD set: reading it (damage reported), its
labels (scanned once per process), building it if it is generated, and its examples' ids."""

import dataclasses
import functools
import os
import time
from collections.abc import Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mood_jax.data import build_lock, folder
from mood_jax.errors import UserError, error_line


@dataclasses.dataclass(frozen=True, eq=False)
class Location:
  """Split `split` of TFDS dataset `dataset` (with builder `config`, if it has one) in data_dir.

  `name` is what a user prepares to make it ('cifar10', 'folder:tin', 'openood:...'); equal
  locations are the same stored split (`__eq__`), so the label scan is cached by them.
  """
  name: str
  dataset: str
  split: str
  config: tfds.core.BuilderConfig | None = None
  encoded: bool = True  # images as file bytes, which `transforms.Decode` reads
  generated: bool = False  # made by its builder from installed packages: built when absent

  def _identity(self) -> tuple:
    # A builder config's name spells out its settings (embedded.DigitsConfig, FolderConfig).
    return self.dataset, self.config.name if self.config else None, self.split

  def __eq__(self, other) -> bool:
    return isinstance(other, Location) and self._identity() == other._identity()

  def __hash__(self) -> int:
    return hash(self._identity())

  def builder(self, data_dir: str) -> tfds.core.DatasetBuilder:
    # ArrayRecord: random access, which grain needs and TFRecord lacks.
    return tfds.builder(self.dataset, data_dir=data_dir, file_format='array_record',
                        **self._builder_kwargs())

  def _builder_kwargs(self) -> dict:
    return {'config': self.config} if self.config else {}

  def read(self, data_dir: str, which: str, *, decode_images: bool = True) -> Sequence[dict]:
    """The records, images decoded by TFDS unless they are `encoded` (or not `decode_images`);
    a damaged record raises UserError naming `which`."""
    kwargs = {} if decode_images and not self.encoded else {
        'decoders': {'image': tfds.decode.SkipDecoding()}}
    # download=False: reading never writes; `prepare` does.
    records = tfds.data_source(self.dataset, split=self.split, data_dir=data_dir, download=False,
                               builder_kwargs=self._builder_kwargs(), **kwargs)
    return _ReportDamage(records, which, 'rerun: it is rebuilt' if self.generated else
                         'prepare it again (docs/datasets.md)')

  def labels(self, data_dir: str, label_key: str) -> np.ndarray:
    """Every record's `label_key`, in order."""
    return _labels(self, data_dir, label_key)

  def build(self, data_dir: str) -> None:
    """Builds this generated dataset (all its splits) unless it is there already."""
    builder = self.builder(data_dir)
    if builder.is_prepared():
      logging.info('Found %s in %s', builder.info.full_name, builder.data_dir)
      return
    with build_lock.held(os.path.dirname(builder.data_dir)):
      if builder.is_prepared():  # by the run that held the lock
        return
      start = time.perf_counter()
      builder.download_and_prepare()
      logging.info('Built %s in %s (%.1f s)', builder.info.full_name, builder.data_dir,
                   time.perf_counter() - start)

  def example_ids(self, data_dir: str, indices) -> np.ndarray:
    """Each example's id, from its split `indices`: its file name (relative to the source
    folder) in an image folder, else the index itself."""
    names = (folder.file_names(self.config.name, data_dir, self.split)
             if isinstance(self.config, folder.FolderConfig) else None)
    return np.asarray([names[i] for i in indices]) if names else np.asarray(indices)


# Each stage and model reads the ID splits again, and a scan of ImageNet's labels reads all of
# its 140 GB: once per process.
@functools.cache
def _labels(location: Location, data_dir: str, label_key: str) -> np.ndarray:
  # Images stay encoded while labels are scanned: decoding would dominate on large sets.
  records = location.read(data_dir, f'{location.name} (split {location.split})',
                          decode_images=False)
  labels = np.fromiter((int(records[i][label_key]) for i in range(len(records))), np.int64,
                       len(records))
  labels.flags.writeable = False  # shared by every caller
  return labels


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
                      f'({error_line(e)}): its files are damaged. Move {directory} '
                      f'aside and {self._rebuild}') from None

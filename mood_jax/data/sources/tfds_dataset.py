"""A TFDS dataset as ID data (data.name: cifar10, cifar100, imagenet2012), prepared by hand in
data_dir (`python -m mood_jax.data.prepare`); its classes come from TFDS's builder code."""

import tensorflow_datasets as tfds

from mood_jax.data.sources import ood_sets, openood, source
from mood_jax.data.sources.location import Location

ID_DATASETS = ('cifar10', 'cifar100', 'imagenet2012')

# OpenOOD v1.5's near-OOD sets per ID dataset when built by hand as folders or from TFDS (the
# rest are far); its own lists, 'openood:...', carry their group (`openood.BENCHMARKS`).
NEAR_OOD = {
    'cifar10': ('cifar100', 'folder:tin'),
    'cifar100': ('cifar10', 'folder:tin'),
    'imagenet2012': ('folder:ssb_hard', 'folder:ninco'),
}


class TfdsSource(source.Source):
  """Splits from `ood_sets.TFDS_SPLITS`; classes from the feature data.label_key."""

  NAMES = ID_DATASETS

  @property
  def label_key(self) -> str:
    return self.cfg.label_key  # CIFAR-100's 'coarse_label' has 20 superclasses

  @property
  def near_ood_sets(self) -> tuple[str, ...]:
    return NEAR_OOD.get(self.cfg.name, ())

  def class_label(self) -> tfds.features.ClassLabel:
    found = ood_sets.features(self.cfg.name)
    feature = found[self.label_key] if self.label_key in found else None
    if not isinstance(feature, tfds.features.ClassLabel):
      labels = [k for k, f in found.items() if isinstance(f, tfds.features.ClassLabel)]
      raise ValueError(f'data.label_key={self.label_key!r} is not a class label of '
                       f'{self.cfg.name}: valid: {labels}')
    return feature

  def _id_location(self, which: str) -> Location:
    train, test = ood_sets.TFDS_SPLITS[self.cfg.name]
    return Location(self.cfg.name, self.cfg.name, train if which == 'id_train' else test)

  def ood_group(self, name: str) -> str:
    return openood.group(self.cfg.name, name) or super().ood_group(name)

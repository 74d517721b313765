"""Real datasets: which TFDS dataset and split holds each ID split and OOD set, and how to get it.

ID data (`data.name`) is one of ID_DATASETS, or 'folder:NAME' built by
`python -m mood_jax.data.folder --labelled` (its splits 'train' and 'test'). OOD sets (`data.ood_sets`) are named by:
  a TFDS name in TFDS_SPLITS      its eval split, every label -1
  '<data.name>_heldout'           ID test split, classes outside data.id_classes (one-class, splits)
  'folder:NAME'                   built by `python -m mood_jax.data.folder --name=NAME ...`
  'openood:BENCHMARK/LIST'        an OpenOOD v1.5 benchmark list (`openood`)
`prepare_command` says how to make each one (`python -m mood_jax.data.prepare`, or `folder`).
"""

import functools

import tensorflow_datasets as tfds

from mood_jax.data import folder, openood, prepare

# TFDS name -> (train split, eval split). Places365 and ImageNet have no labelled test split.
TFDS_SPLITS = {
    'cifar10': ('train', 'test'),
    'cifar100': ('train', 'test'),
    'svhn_cropped': ('train', 'test'),
    'dtd': ('train', 'test'),  # Textures
    'places365_small': ('train', 'validation'),
    'imagenet2012': ('train', 'validation'),
    # MOOD's ImageNet-30 OOD sets:
    'stanford_dogs': ('train', 'test'),
    'oxford_flowers102': ('train', 'test'),
    'oxford_iiit_pet': ('train', 'test'),
    'food101': ('train', 'validation'),
}
ID_DATASETS = ('cifar10', 'cifar100', 'imagenet2012')
HELDOUT_SUFFIX = '_heldout'

# OpenOOD v1.5's near-OOD sets per ID dataset when built by hand as folders or from TFDS (the
# rest are far); its own lists, 'openood:...', carry their group (`openood.BENCHMARKS`).
NEAR_OOD = {
    'cifar10': ('cifar100', 'folder:tin'),
    'cifar100': ('cifar10', 'folder:tin'),
    'imagenet2012': ('folder:ssb_hard', 'folder:ninco'),
}

def prepare_command(which: str, data_dir: str) -> str:
  """How to make TFDS dataset or OOD set `which` available in data_dir."""
  if which.startswith(folder.PREFIX):
    return f'`{folder.prepare_command(which[len(folder.PREFIX):], data_dir)}`'
  return prepare.command(which, data_dir)  # every name in TFDS_SPLITS, or openood:...


@functools.cache  # asked for often; builders read ImageNet's class list from a file
def features(tfds_name: str) -> tfds.features.FeaturesDict:
  """From the builder's code: known without the data."""
  return tfds.builder(tfds_name).info.features


def heldout_set(id_name: str) -> str:
  return id_name + HELDOUT_SUFFIX


def location(id_name: str, which: str) -> tuple[str, folder.FolderConfig | None, str]:
  """(TFDS name, builder config or None, split) of 'id_train', 'id_test' or an OOD set."""
  if which not in ('id_train', 'id_test', heldout_set(id_name)):
    return ood_location(id_name, which)
  if id_name.startswith(folder.PREFIX):  # a labelled folder
    name, config = 'mood_folder', folder.FolderConfig(name=id_name[len(folder.PREFIX):])
    train, test = folder.TRAIN_SPLIT, folder.SPLIT
  else:
    (name, config), (train, test) = (id_name, None), TFDS_SPLITS[id_name]
  return name, config, train if which == 'id_train' else test


def ood_location(id_name: str, which: str) -> tuple[str, folder.FolderConfig | None, str]:
  """`location` of an OOD set from another dataset: a folder or another TFDS dataset."""
  if which.startswith(folder.PREFIX):
    return 'mood_folder', folder.FolderConfig(name=which[len(folder.PREFIX):]), folder.SPLIT
  if which.startswith(openood.PREFIX):  # stored as a folder dataset by `prepare`
    return 'mood_folder', folder.FolderConfig(name=openood.folder_name(which)), folder.SPLIT
  if which in TFDS_SPLITS and which != id_name:
    return which, None, TFDS_SPLITS[which][1]
  valid = [heldout_set(id_name)] + [n for n in TFDS_SPLITS if n != id_name]
  raise ValueError(f'unknown OOD set {which!r} for data.name={id_name!r}: valid: {valid} or '
                   f'{folder.PREFIX}NAME (an image folder: `python -m mood_jax.data.folder`) or '
                   f'{openood.PREFIX}BENCHMARK/LIST (an OpenOOD v1.5 list)')


def ood_group(id_name: str, which: str, validation_sets) -> str:
  if which in validation_sets:
    return 'validation'
  near = NEAR_OOD.get(id_name, ()) + (heldout_set(id_name),)
  return openood.group(id_name, which) or ('near' if which in near else 'far')

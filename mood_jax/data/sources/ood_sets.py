"""OOD sets stored apart from any ID data, which every source can score, and how to make each.

Besides a source's own sets (`source.Source`), `data.ood_sets` may name:
  a TFDS name in TFDS_SPLITS      its eval split, every label -1 (not the ID dataset itself)
  'folder:NAME'                   built by `python -m mood_jax.data.folder --name=NAME ...`
  'openood:BENCHMARK/LIST'        an OpenOOD v1.5 benchmark list (`openood`)
`prepare_command` says how to make each one (`python -m mood_jax.data.prepare`, or `folder`).
TFDS_SPLITS and `features` serve the TFDS ID source (`tfds_dataset`) too.
"""

import functools

import tensorflow_datasets as tfds

from mood_jax.data import folder, prepare
from mood_jax.data.sources import openood
from mood_jax.data.sources.location import Location

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
    # Grayscale, 28 px: ID data of their own (`grayscale`), and OOD sets for each other.
    'fashion_mnist': ('train', 'test'),
    'mnist': ('train', 'test'),
}
# How the named sets beyond `tfds_names` are written, for error messages.
NAMED = (f'{folder.PREFIX}NAME (an image folder: `python -m mood_jax.data.folder`) or '
         f'{openood.PREFIX}BENCHMARK/LIST (an OpenOOD v1.5 list)')


def prepare_command(which: str, data_dir: str) -> str:
  """How to make TFDS dataset or OOD set `which` available in data_dir."""
  if which.startswith(folder.PREFIX):
    return f'`{folder.prepare_command(which[len(folder.PREFIX):], data_dir)}`'
  return prepare.command(which, data_dir)  # every name in TFDS_SPLITS, or openood:...


@functools.cache  # asked for often; builders read ImageNet's class list from a file
def features(tfds_name: str) -> tfds.features.FeaturesDict:
  """From the builder's code: known without the data."""
  return tfds.builder(tfds_name).info.features


def location(which: str, id_name: str) -> Location | None:
  """Where OOD set `which` is, if it is one of these for ID dataset `id_name`; else None."""
  if which.startswith(folder.PREFIX):
    return _folder(which, which[len(folder.PREFIX):])
  if which.startswith(openood.PREFIX):  # stored as a folder dataset by `prepare`
    return _folder(which, openood.folder_name(which))
  if which in tfds_names(id_name):
    return Location(which, which, TFDS_SPLITS[which][1])
  return None


def tfds_names(id_name: str) -> list[str]:
  """The TFDS datasets that are OOD sets for ID dataset `id_name`."""
  return [name for name in TFDS_SPLITS if name != id_name]


def _folder(which: str, name: str) -> Location:
  return Location(which, folder.MoodFolder.name, folder.SPLIT, folder.FolderConfig(name=name))

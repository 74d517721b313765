"""OpenOOD v1.5's benchmark image lists as named OOD sets: 'openood:<id>/<list>'.

'openood:cifar10/test_tin' is the images of OpenOOD's `benchmark_imglist/cifar10/test_tin.txt`
(lines 'relative/path label'), read from OpenOOD's image root, as OpenOOD's ImglistDataset reads
them (Jingkang50/OpenOOD openood/datasets/imglist_dataset.py). `python -m mood_jax.data.prepare`
stores each list once, as a `folder` dataset, from OpenOOD's `data/` folder (`--manual_dir`).
"""

import os

from mood_jax.errors import UserError

PREFIX = 'openood:'

# OpenOOD v1.5's OOD sets per ID benchmark, by group, as its configs/datasets/<id>/<id>_ood.yml
# (Jingkang50/OpenOOD): 'validation' is their `val` split (hyperparameter choice only).
BENCHMARKS = {
    'cifar10': {'validation': ('val_tin',), 'near': ('test_cifar100', 'test_tin'),
                'far': ('test_mnist', 'test_svhn', 'test_texture', 'test_places365')},
    'cifar100': {'validation': ('val_tin',), 'near': ('test_cifar10', 'test_tin'),
                 'far': ('test_mnist', 'test_svhn', 'test_texture', 'test_places365')},
    'imagenet': {'validation': ('val_openimage_o',), 'near': ('test_ssb_hard', 'test_ninco'),
                 'far': ('test_inaturalist', 'test_textures', 'test_openimage_o')},
}
# Our ID dataset names -> OpenOOD's benchmark names.
BENCHMARK_OF = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'imagenet2012': 'imagenet'}
# The `data_dir` of each list in those configs: images_classic for the CIFAR benchmarks and
# ImageNet's Textures, images_largescale for the rest of ImageNet's.
_CLASSIC, _LARGESCALE = 'images_classic', 'images_largescale'
# Jingkang50/OpenOOD scripts/download/download.py fetches the lists and the image zips into data/.
_PUBLISHED = ('OpenOOD v1.5 publishes them: in a clone of github.com/Jingkang50/OpenOOD, `python '
              'scripts/download/download.py --contents datasets --datasets ood_v1.5` makes data/')


def sets(benchmark: str, group: str) -> tuple[str, ...]:
  """sets('cifar10', 'near') -> ('openood:cifar10/test_cifar100', 'openood:cifar10/test_tin')."""
  return tuple(f'{PREFIX}{benchmark}/{name}' for name in BENCHMARKS[benchmark][group])


def all_sets(benchmark: str) -> tuple[str, ...]:
  """Every OOD set of an OpenOOD benchmark: near, far, then validation."""
  return sum((sets(benchmark, g) for g in ('near', 'far', 'validation')), ())


def group(id_name: str, which: str) -> str | None:
  """OpenOOD's group ('validation', 'near', 'far') of `which` for ID dataset `id_name`, if any."""
  for group_name, names in BENCHMARKS.get(BENCHMARK_OF.get(id_name), {}).items():
    if which in sets(BENCHMARK_OF[id_name], group_name):
      return group_name
  return None


def _parse(which: str) -> tuple[str, str]:
  benchmark, _, name = which[len(PREFIX):].partition('/')
  if not any(name in names for names in BENCHMARKS.get(benchmark, {}).values()):
    valid = [s for b, groups in BENCHMARKS.items() for g in groups for s in sets(b, g)]
    raise UserError(f'unknown OpenOOD set {which!r}: valid: {valid}')
  return benchmark, name


def folder_name(which: str) -> str:
  """The `folder` dataset of `which`: openood:cifar10/test_tin -> openood_cifar10_test_tin."""
  return 'openood_' + '_'.join(_parse(which))


def image_files(which: str, openood_data: str) -> list[str]:
  """The image paths that `which`'s list names, in list order, under OpenOOD's `data/` folder."""
  benchmark, name = _parse(which)
  imglist = os.path.join(openood_data, 'benchmark_imglist', benchmark, name + '.txt')
  if not os.path.isfile(imglist):
    raise UserError(f'{imglist} not found: --manual_dir must be OpenOOD\'s data/ folder, with '
                    f'benchmark_imglist/ and the image folders; {_PUBLISHED}')
  largescale = benchmark == 'imagenet' and name != 'test_textures'
  root = os.path.join(openood_data, _LARGESCALE if largescale else _CLASSIC)
  with open(imglist) as f:
    paths = [os.path.join(root, line.split(' ', 1)[0]) for line in f if line.strip()]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise UserError(f'{len(missing)} of the {len(paths)} images of {imglist} are missing, e.g. '
                    f'{missing[0]}: unpack the image zips into {root}; {_PUBLISHED}')
  return paths

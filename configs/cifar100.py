"""MOOD on CIFAR-100 (ID) with BEiT-L/16 at 224 px; recipe as configs/cifar10.py.

  --config=configs/cifar100.py          the paper's recipe (datasets prepared: docs/datasets.md)
  --config=configs/cifar100.py:from_scratch  our pixel-target MIM pretraining instead (cifar10.py)
  --config=configs/cifar100.py:smoke    a seconds-long CPU run for tests (TFDS mock data)

OOD: OpenOOD v1.5's CIFAR-100 benchmark lists (configs/datasets/cifar100/cifar100_ood.yml): near =
CIFAR-10, TinyImageNet; far = MNIST, SVHN, Textures, Places365; its TinyImageNet validation list
chooses hyperparameters only. MOOD's own table: SVHN, CIFAR-10, LSUN (a folder).
"""

import os
import runpy

import ml_collections

from mood_jax.data.sources import openood

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
TRAIN_EXAMPLES = 50_000  # CIFAR-100 train split


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, _cifar10['PRESETS'], 'configs/cifar100.py')
  config = _cifar10['paper_config']('cifar100', TRAIN_EXAMPLES, openood.all_sets('cifar100'),
                                    opts)
  config.data.validation_ood_sets = openood.sets('cifar100', 'validation')
  return config

"""MOOD on CIFAR-100 (ID) with BEiT-L/16 at 224 px; recipe as configs/cifar10.py.

  --config=configs/cifar100.py          the paper's recipe (needs the datasets prepared, README)
  --config=configs/cifar100.py:from_scratch  our pixel-target MIM pretraining instead (cifar10.py)
  --config=configs/cifar100.py:smoke    a seconds-long CPU run for tests (TFDS mock data)

OOD: OpenOOD v1.5 CIFAR-100: near = CIFAR-10 (+ TinyImageNet as folder:tin); far = SVHN, Textures,
Places365 (+ MNIST as a folder). MOOD's own table: SVHN, CIFAR-10, LSUN (a folder).
"""

import os
import runpy

import ml_collections

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
TRAIN_EXAMPLES = 50_000  # CIFAR-100 train split


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, _cifar10['PRESETS'], 'configs/cifar100.py')
  return _cifar10['paper_config']('cifar100', TRAIN_EXAMPLES,
                                  ('cifar10', 'svhn_cropped', 'dtd', 'places365_small'),
                                  opts)

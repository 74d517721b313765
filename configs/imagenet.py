"""MOOD on ImageNet-1k (ID) with BEiT-L/16 at 224 px.

  --config=configs/imagenet.py          the paper's recipe (needs the datasets prepared, README)
  --config=configs/imagenet.py:smoke    a seconds-long CPU run for tests (TFDS mock data)

OOD: MOOD's iNaturalist / SUN / Places (the MOS paper's subsets, image folders: build each once
with `python -m mood_jax.data.folder --name=NAME --source=DIR`) / Textures (TFDS `dtd`), then
OpenOOD v1.5's ImageNet benchmark lists (configs/datasets/imagenet/imagenet_ood.yml): near =
SSB-hard, NINCO; far = iNaturalist, Textures, OpenImage-O; its OpenImage-O validation list chooses
hyperparameters only; and ImageNet-O (MOODv2, a folder). Hyperparameters: configs/cifar10.py,
whose MOOD fine-tune recipe is the same for every ID set (MOOD's README).
"""

import os
import runpy

import ml_collections

from mood_jax.data import openood

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
TRAIN_EXAMPLES = 1_281_167  # imagenet2012 train split
OOD_SETS = ('folder:inaturalist', 'folder:sun', 'folder:places', 'dtd',  # MOOD's table
            *openood.all_sets('imagenet'),                                # OpenOOD v1.5
            'folder:imagenet_o')                                         # MOODv2


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, ('smoke',), 'configs/imagenet.py')
  config = _cifar10['paper_config']('imagenet2012', TRAIN_EXAMPLES, OOD_SETS, 'smoke' in opts)
  config.data.validation_ood_sets = openood.sets('imagenet', 'validation')
  return config

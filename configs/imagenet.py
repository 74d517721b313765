"""MOOD on ImageNet-1k (ID) with BEiT-L/16 at 224 px.

  --config=configs/imagenet.py          the paper's recipe (needs the datasets prepared, README)
  --config=configs/imagenet.py:smoke    a seconds-long CPU run for tests (TFDS mock data)

OOD: MOOD's iNaturalist / SUN / Places (the MOS paper's subsets) / Textures, then OpenOOD v1.5's
ImageNet near (SSB-hard, NINCO) and far (iNaturalist, Textures, OpenImage-O) sets, and ImageNet-O
(MOODv2). All but Textures (TFDS `dtd`) ship as image folders: build each once with
`python -m mood_jax.data.folder --name=NAME --source=DIR`. Hyperparameters: configs/cifar10.py,
whose MOOD fine-tune recipe is the same for every ID set (MOOD's README).
"""

import os
import runpy

import ml_collections

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
TRAIN_EXAMPLES = 1_281_167  # imagenet2012 train split
OOD_SETS = ('folder:inaturalist', 'folder:sun', 'folder:places', 'dtd',  # MOOD's table
            'folder:ssb_hard', 'folder:ninco', 'folder:openimage_o',    # OpenOOD v1.5
            'folder:imagenet_o')                                         # MOODv2


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, ('smoke',), 'configs/imagenet.py')
  return _cifar10['paper_config']('imagenet2012', TRAIN_EXAMPLES, OOD_SETS, 'smoke' in opts)

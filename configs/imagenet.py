"""MOOD on ImageNet-1k (ID) with BEiT-L/16 at 224 px.

  --config=configs/imagenet.py               MOOD's ImageNet-1k row: BEiT's public pt22k_ft1k
                                             classifier, converted with its head, scored as
                                             released (no training; needs the datasets prepared)
  --config=configs/imagenet.py:from_scratch  ours: pixel-target MIM pretraining on ImageNet-1k,
                                             then MOOD's fine-tune (configs/cifar10.py)
  --config=configs/imagenet.py:smoke         a seconds-long CPU run for tests (TFDS mock data)

OOD: MOOD's iNaturalist / SUN / Places (the MOS paper's subsets, image folders: build each once
with `python -m mood_jax.data.folder --name=NAME --source=DIR`) / Textures (TFDS `dtd`: 1,880
of the 5,640 images MOOD scores, see README), then
OpenOOD v1.5's ImageNet benchmark lists (configs/datasets/imagenet/imagenet_ood.yml): near =
SSB-hard, NINCO; far = iNaturalist, Textures, OpenImage-O; its OpenImage-O validation list chooses
hyperparameters only; and ImageNet-O (MOODv2, a folder). Hyperparameters: configs/cifar10.py,
whose MOOD fine-tune recipe is the same for every ID set (MOOD's README).
"""

import os
import runpy

import ml_collections

from mood_jax.data.sources import openood

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
TRAIN_EXAMPLES = 1_281_167  # imagenet2012 train split
# MOOD's table, but for Textures: `dtd` is TFDS's test split of partition 1 (1,880 images),
# where MOOD's and OpenOOD's Textures column scores all 5,640 (README, "Reproducing MOOD").
OOD_SETS = ('folder:inaturalist', 'folder:sun', 'folder:places', 'dtd',
            *openood.all_sets('imagenet'),                                # OpenOOD v1.5
            'folder:imagenet_o')                                         # MOODv2


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, _cifar10['PRESETS'], 'configs/imagenet.py')
  config = _cifar10['paper_config']('imagenet2012', TRAIN_EXAMPLES, OOD_SETS, opts)
  config.data.validation_ood_sets = openood.sets('imagenet', 'validation')
  if 'from_scratch' not in opts:
    # MOOD's README: the ImageNet-1k table's checkpoint is BEiT's pt22k_ft1k, scored by
    # eval_with_features.py (Mahalanobis) and eval_with_logits.py without further training.
    config.stages = 'evaluate'
    config.evaluate.models = 'converted'
    _cifar10['use_public_weights'](config, 'beit_large_patch16_224_pt22k_ft1k', '--keep_head')
  return config

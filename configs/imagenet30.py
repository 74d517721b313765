"""MOOD on ImageNet-30 (ID) with BEiT-L/16 at 224 px; recipe as configs/cifar10.py.

  --config=configs/imagenet30.py          the paper's recipe (datasets prepared: docs/datasets.md)
  --config=configs/imagenet30.py:from_scratch  our pixel-target MIM pretraining instead (cifar10.py)
  --config=configs/imagenet30.py:smoke    a seconds-long CPU run for tests (TFDS mock data)

ImageNet-30 is Hendrycks et al. 2019's ("Using self-supervised learning can improve model
robustness and uncertainty", repo hendrycks/ss-ood) 30 ImageNet-1k classes, which MOOD uses (its
README, datasets/imagenet30.py). Here it is `imagenet2012` restricted to those classes' synsets:
training images are the same 39,000 (1,300 a class); the test images are ImageNet's validation
images of those classes (50 a class), not Hendrycks' own test set of 3,000, which ships as
folders (build it with `python -m mood_jax.data.folder` to use it as an OOD-free check).
OOD: MOOD's ImageNet-30 table: Stanford Dogs, Places365, Flowers102, Oxford Pets, Food-101,
Caltech-256 (a folder), Textures.
"""

import os
import runpy

import ml_collections

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
# Class name (Hendrycks' folder names) -> ImageNet synset (wnid), the TFDS label name.
CLASSES = {
    'acorn': 'n12267677', 'airliner': 'n02690373', 'ambulance': 'n02701002',
    'american_alligator': 'n01698640', 'banjo': 'n02787622', 'barn': 'n02793495',
    'bikini': 'n02837789', 'digital_clock': 'n03196217', 'dragonfly': 'n02268443',
    'dumbbell': 'n03255030', 'forklift': 'n03384352', 'goblet': 'n03443371',
    'grand_piano': 'n03452741', 'hotdog': 'n07697537', 'hourglass': 'n03544143',
    'manhole_cover': 'n03717622', 'mosque': 'n03788195', 'nail': 'n03804744',
    'parking_meter': 'n03891332', 'pillow': 'n03938244', 'revolver': 'n04086273',
    'rotary_dial_telephone': 'n03187595', 'schooner': 'n04147183', 'snowmobile': 'n04252077',
    'soccer_ball': 'n04254680', 'stingray': 'n01498041', 'strawberry': 'n07745940',
    'tank': 'n04389033', 'toaster': 'n04442312', 'volcano': 'n09472597',
}
TRAIN_EXAMPLES = 39_000
OOD_SETS = ('stanford_dogs', 'places365_small', 'oxford_flowers102', 'oxford_iiit_pet',
            'food101', 'folder:caltech256', 'dtd')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, _cifar10['PRESETS'], 'configs/imagenet30.py')
  config = _cifar10['paper_config']('imagenet2012', TRAIN_EXAMPLES, OOD_SETS, opts)
  config.data.id_classes = tuple(CLASSES.values())
  return config

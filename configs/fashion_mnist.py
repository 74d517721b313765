"""Fashion-MNIST (70,000 28 px grayscale garments, 10 classes), sized for 2 CPU cores.

Prepare it once: `python -m mood_jax.data.prepare fashion_mnist` (Debian's dataset-fashion-mnist,
or --manual_dir=DIR with the four IDX files, or downloaded when online).

  --config=configs/fashion_mnist.py               ID = the 10 classes; far OOD = scikit-learn's
                                                  digits (MNIST-like), textures, photos, faces,
                                                  noise, blobs at 28 px; validation OOD = letters
  --config=configs/fashion_mnist.py:split         ID = classes 0-4; near OOD = test classes 5-8;
                                                  class 9's train images = near-OOD validation
  --config=configs/fashion_mnist.py:oneclass=3    ID = class 3 alone (its 6,000 train images):
                                                  MIM pretrain, then MOOD's Mahalanobis on its
                                                  encoder; OOD = the other nine test classes
  --config=configs/fashion_mnist.py:oneclass=all  each class in turn, then the mean (MOOD's and
                                                  GEOM's one-class protocol)
  --config=configs/fashion_mnist.py:smoke         a seconds-long run for tests (combine:
                                                  split,smoke; oneclass=all,smoke)

How each value was chosen, on validation only (never on a test split): every choice reads
letters (and, with split, class 9's train images) against id_val, 10% of each ID class's train
images that training never reads. The model, optimizer, masking and logit_ft values are
configs/digits.py's, which chose them that way on the digits (its comments say how). The data
fields are Fashion-MNIST's own: 28 px is its size (4 px patches, 49 tokens), grayscale.
Training lengths are what fits the time budget on 2 CPU cores (README, "Fashion-MNIST": the
measured wall time of each preset), not tuned on any score; batch 128 as the digits'.
"""

import os
import runpy

import ml_collections

from mood_jax.data.sources import embedded, grayscale

_digits = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits.py'))

NAME = 'fashion_mnist'
FAR_OOD = (grayscale.DIGITS_SET, *embedded.FAR_OOD_SETS)
VALIDATION_OOD = embedded.VALIDATION_OOD_SETS
NEAR_VALIDATION_CLASS = 9  # split: ankle boot, held out of the near test set for validation
# Optimizer steps of each stage: an epoch of the 54,000 training images is 422 steps of 128.
STEPS = dict(pretrain=1000, finetune=600, logit_ft=200)
ONE_CLASS_PRETRAIN_STEPS = 300  # per class (5,400 images: 7 epochs), ten classes in a job


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  options = dict(opt.partition('=')[::2] for opt in arg.split(',') if opt)
  unknown = set(options) - {'split', 'oneclass', 'smoke'}
  if unknown:
    raise ValueError(f'unknown configs/fashion_mnist.py options {sorted(unknown)}: '
                     'use split, oneclass=C (or all), smoke')
  # The digits' presets, one-class and smoke included, then Fashion-MNIST's data and lengths.
  config = _digits['get_config'](','.join(f'{k}={v}' if v else k for k, v in options.items()
                                          if k in ('oneclass', 'smoke')))
  data = config.data
  data.name, data.data_dir = NAME, '~/tensorflow_datasets'  # where `prepare` writes
  data.image_size = 16 if 'smoke' in options else 28
  data.id_val_fraction = 0.1
  data.id_classes = () if not options.get('oneclass') else data.id_classes
  data.ood_sets = (*FAR_OOD, *VALIDATION_OOD)
  if 'split' in options:
    data.id_classes = (0, 1, 2, 3, 4)
    data.heldout_validation_classes = (NEAR_VALIDATION_CLASS,)
    data.ood_sets = (f'{NAME}_heldout', f'{NAME}_heldout_val', *data.ood_sets)
  if 'oneclass' in options:
    data.ood_sets = (f'{NAME}_heldout', *data.ood_sets)
  if 'smoke' in options:
    return config
  for stage, steps in STEPS.items():
    config[stage].num_steps = steps
  config.pretrain.update(warmup_steps=100, ckpt_every=250)
  config.finetune.update(warmup_steps=50, ckpt_every=200, eval_every=300)
  config.logit_ft.update(warmup_steps=20, ckpt_every=100, eval_every=0)
  if 'oneclass' in options:
    config.pretrain.update(num_steps=ONE_CLASS_PRETRAIN_STEPS, ckpt_every=100)
  return config

"""One-class MOOD on CIFAR: ID = one class, OOD = the other classes of the same test split.

  --config=configs/cifar10_oneclass.py:class=3        CIFAR-10, ID = cat (3): 1,000 ID, 9,000 OOD
  --config=configs/cifar10_oneclass.py:superclass=4   CIFAR-100, ID = one of its 20 superclasses
                                                      (TFDS 'coarse_label'): 500 ID, 9,500 OOD
  --config=configs/cifar10_oneclass.py:class=all      each class in turn, then the mean (also
                                                      superclass=all)
  --config=configs/cifar10_oneclass.py:class=3,from_scratch  ours: pixel-target MIM pretraining
                                                      on the one class's 5,000 images instead
  --config=configs/cifar10_oneclass.py:class=3,finetune  MOOD's one-class fine-tune (which its
                                                      paper ran on ImageNet-30 only): pt22k
                                                      fine-tuned on the one class with the
                                                      dataset's 10-way (100-way) head, then scored
  --config=configs/cifar10_oneclass.py:class=3,smoke  a seconds-long CPU run for tests

What MOOD ran (its README: "we only fine-tuned one-class imagenet30"; eval_with_features.py
--class_idx): no training on CIFAR; the features of BEiT's public ImageNet-22k self-supervised
checkpoint (pt22k, mean-pooled, fresh fc_norm) scored by its Mahalanobis distance, with the
ID-train bank through the training transforms. MOOD's README reports per-class AUROCs on
CIFAR-10 (98.6 99.3 94.3 93.2 98.1 96.5 99.3 99.0 98.8 97.8) and 96.4 averaged over CIFAR-100's
superclasses: class=all (superclass=all) runs each and writes the mean. The from_scratch preset
is not comparable to those numbers (another pretraining target, on 5,000 images).
"""

import os
import runpy

import ml_collections

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
CLASS_EXAMPLES = {'cifar10': 5_000, 'cifar100': 2_500}  # training images per (super)class


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, ('class', 'superclass', 'finetune', *_cifar10['PRESETS']),
                             'configs/cifar10_oneclass.py')
  if 'class' in opts and 'superclass' in opts:
    raise ValueError('configs/cifar10_oneclass.py: give class=C (CIFAR-10) or superclass=S '
                     '(CIFAR-100), not both')
  name = 'cifar100' if 'superclass' in opts else 'cifar10'
  config = _cifar10['paper_config'](name, CLASS_EXAMPLES[name], (f'{name}_heldout',), opts)
  if name == 'cifar100':
    config.data.label_key = 'coarse_label'
  chosen = opts.get('superclass') or opts.get('class') or '0'
  config.one_class_each = chosen == 'all'
  config.data.id_classes = () if config.one_class_each else (int(chosen),)
  if 'finetune' in opts:  # MOOD's README, "One-class Fine-tuning"
    config.data.head_all_classes = True
    config.evaluate.models = 'finetune'
  else:  # a one-way head has nothing to learn: score an encoder's features
    config.stages = 'pretrain,evaluate' if 'from_scratch' in opts else 'evaluate'
    config.evaluate.models = 'pretrain' if 'from_scratch' in opts else 'converted'
  config.evaluate.scorers = 'mahalanobis_mood'  # MOOD's one-class score
  return config

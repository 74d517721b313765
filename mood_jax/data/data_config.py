"""`config.data`: its fields, their defaults and range checks; a stage's `augment` choices.

The dataset, class and OOD set names are checked where they are looked up (`catalogue`).
"""

import math
import os

import ml_collections

from mood_jax import config_checks
from mood_jax.data.sources import embedded
from mood_jax.errors import UserError

# A stage's `augment` (`input_pipeline.train_transforms`).
AUGMENT_CHOICES = (True, False, 'crop')


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=embedded.NAME,
      data_dir='~/.cache/mood_jax/tensorflow_datasets',
      image_size=24,  # digits are 8x8; with 4 px patches, 24 px gives 36 tokens
      # Tuples, not lists: ml_collections can override only tuples from the command line.
      id_classes=(0, 1, 2, 3, 4),  # empty or None: all classes
      ood_sets=(embedded.HELDOUT_SET, *embedded.FAR_OOD_SETS),  # the test sets
      mean=0.5,
      std=0.5,
      test_fraction=0.3,
      split_seed=0,
      ood_examples_per_set=500,
      num_workers=0,  # 0: in-process; more: grain worker processes
      validation_ood_sets=(),  # those of ood_sets that choose hparams (evaluate.sweep)
      # > 0: that fraction of each ID class of ID train (drawn with split_seed) is 'id_val',
      # never trained on, the ID side of every validation score (evaluate, its sweeps, eval
      # during training), so that no choice reads the test split. 0: no ID validation split.
      id_val_fraction=0.0,
      # Classes outside id_classes whose ID train images are '<name>_heldout_val', a near-OOD
      # validation set (add it to ood_sets); '<name>_heldout' then keeps the other classes.
      heldout_validation_classes=(),
      label_key='label',       # a TFDS ID dataset's: CIFAR-100's 'coarse_label' has 20 superclasses
      # Images of any size (not the embedded sets, which are stored at image_size):
      crop_scale=(0.08, 1.0),  # train RandomResizedCrop area range (BEiT/timm default)
      hflip=0.5,               # train horizontal flip probability
      randaugment_ops=0,       # train RandAugment operations per image; 0: off (BEiT: 2)
      randaugment_magnitude=9.0,  # of 10 (BEiT fine-tune: 'rand-m9-mstd0.5-inc1')
      random_erasing=0.0,      # train random-erasing probability (BEiT fine-tune: 0.25)
      color_jitter=0.0,        # augment='crop' only: ColorJitter strength (BEiT pretraining: 0.4)
      eval_crop_fraction=0.875,  # eval: shorter side to image_size / this, centre crop
      # > 0: every image, ID and OOD, train and eval, is first brought to this square size
      # (the ID set's own: OpenOOD's CIFAR benchmarks at 32 px), then the transforms above.
      native_size=0,
      # True: the classifier has a logit for every class of the dataset and ID labels keep
      # their index, so one ID class can be fine-tuned (MOOD's one-class fine-tune keeps the
      # dataset's head: MOODv1/datasets.py build_dataset with --class_idx).
      head_all_classes=False,
  ))


def _check_data_dir(data_dir: str) -> None:
  """A local data_dir whose path runs into a file: before the workdir's lock is taken (the
  datasets are built there after it). A remote one (gs://) is the store's to check."""
  if '://' in data_dir:
    return
  path = os.path.abspath(os.path.expanduser(data_dir))
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f'data.data_dir={data_dir!r}: {path} is a file, where a directory is '
                    'needed: use another path')


def check_config(data_cfg) -> None:
  """`config.data`'s ranges, and a data_dir that can be a directory."""
  _check_data_dir(data_cfg.data_dir)
  config_checks.at_least('data.image_size', data_cfg.image_size, 1, 24)
  config_checks.inside('data.std', data_cfg.std, 0, math.inf, 0.5)
  config_checks.at_least('data.ood_examples_per_set', data_cfg.ood_examples_per_set, 1, 500)
  config_checks.at_least('data.num_workers', data_cfg.num_workers, 0, 0)
  config_checks.inside('data.test_fraction', data_cfg.test_fraction, 0, 1, 0.3)
  config_checks.inside('data.id_val_fraction', data_cfg.id_val_fraction, 0, 1, 0.2,
                       closed='low')
  config_checks.inside('data.eval_crop_fraction', data_cfg.eval_crop_fraction, 0, 1, 0.875,
                       closed='high')
  for name, example in (('hflip', 0.5), ('random_erasing', 0.25)):
    config_checks.inside(f'data.{name}', data_cfg[name], 0, 1, example, closed='both')
  config_checks.at_least('data.randaugment_ops', data_cfg.randaugment_ops, 0, 2)
  config_checks.at_least('data.native_size', data_cfg.native_size, 0, 32)
  config_checks.inside('data.randaugment_magnitude', data_cfg.randaugment_magnitude, 0, 10,
                       9.0, closed='both')
  low, high = (tuple(data_cfg.crop_scale) + (None, None))[:2]
  if len(data_cfg.crop_scale) != 2 or not 0 < low <= high <= 1:
    config_checks.fail('data.crop_scale', tuple(data_cfg.crop_scale),
                       'must be (low, high) with 0 < low <= high <= 1', "'(0.08,1.0)'")

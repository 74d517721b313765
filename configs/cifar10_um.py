"""Unleashing Mask's logit fine-tune schedule on CIFAR-10, after MOOD's pretrain and finetune.

  --config=configs/cifar10_um.py          UM's recipe for logit_ft (datasets: docs/datasets.md)
  --config=configs/cifar10_um.py:smoke    a seconds-long CPU run for tests (TFDS mock data)

Everything but `logit_ft` is configs/cifar10.py (MOOD's BEiT-L/16 recipe). UM's `logit_ft`
numbers come from tmlr-group/Unleashing-Mask: UM = configs/smallscale/densenet_cifar10.yaml,
EST = configs/estimate_loss/estimate_loss_cifar10.yaml, SGD = utils/net_utils.py
`get_optimizer`, COS = utils/schedulers.py `cosine_lr`. UM trains a DenseNet-101; our ViT
replaces it, so its dropout (`droprate: 0.3`) has no counterpart here and the ViT keeps
the finetune stage's drop path.
"""

import os
import runpy

import ml_collections

_cifar10 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
TRAIN_EXAMPLES = 50_000  # CIFAR-10 train split


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = _cifar10['options'](arg, _cifar10['PRESETS'], 'configs/cifar10_um.py')
  config = _cifar10['get_config'](arg)
  config.stages = config.stages.replace('finetune', 'finetune,logit_ft')
  config.logit_ft.update(
      loss='um',               # UM paper: flooding (UM's own config leaves criterion as CE)
      gamma_from='masked_model',
      weight_keep_ratio=0.965,  # EST: prune_rate 0.965 of each layer kept
      label_smoothing=0.0,     # UM: label_smoothing unset (plain CE), for loss and gamma
      init_step=-1,            # UM: pretrained densenet_cifar10_last.state (the last)
      optimizer='sgd',         # UM: optimizer sgd
      lr=0.1,                  # UM: lr 0.1
      momentum=0.9,            # UM: momentum 0.9; SGD: nesterov off
      weight_decay=1e-4,       # UM: weight_decay 0.0001, on every param (SGD: bn too)
      min_lr=0.0,              # COS: 0.5 (1 + cos(pi e / E)) lr, down to 0 (per epoch there)
      layer_decay=1.0)         # UM: one lr for the whole network
  if 'smoke' not in opts:  # cifar10.py:smoke's sizes stand
    config.logit_ft.update(
        warmup_steps=0,        # COS: warmup_length 0 by default
        batch_size=256,        # UM: batch_size 256
        num_steps=_cifar10['epochs'](100, 256, TRAIN_EXAMPLES),  # UM: epochs 100
        ckpt_every=1000)
  return config

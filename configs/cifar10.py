"""MOOD on CIFAR-10 (ID) with BEiT-L/16 at 224 px; OOD = OpenOOD v1.5's CIFAR-10 benchmark lists.

  --config=configs/cifar10.py               MOOD's pipeline: fine-tune BEiT's public ImageNet-22k
                                            checkpoint (converted, docs/reproducing_mood.md), then
                                            score (needs the datasets prepared, docs/datasets.md)
  --config=configs/cifar10.py:from_scratch  ours instead of the public weights: MIM pretraining on
                                            the ID data with *pixel* targets (BEiT's blockwise
                                            masks), then the same fine-tune; MOOD's BEiT predicts
                                            DALL-E visual tokens, so this is another pretext task
  --config=configs/cifar10.py:smoke         a seconds-long CPU run for tests (TFDS mock data)

Sources: MOOD = dvlab-research/MOOD MOODv1/README.md (its fine-tune command is the same for every
ID set) and MOODv1/*.py; BEiT = microsoft/unilm beit/README.md and beit/*.py (pretraining);
method.md = ../shared/docs/method.md.
Every field of configs/digits.py is here (this config starts from it); real-data fields override.
"""

import os
import runpy

import ml_collections

from mood_jax.data.sources import openood

_HERE = os.path.dirname(os.path.abspath(__file__))
_TRAIN_EXAMPLES = 50_000  # CIFAR-10 train split


# The ID sets whose OpenOOD benchmarks are scored at the ID images' size (preprocessor.py's
# default_preprocessing_dict; ImageNet's 256/224 is our eval crop already).
OPENOOD_NATIVE_SIZES = {'cifar10': 32, 'cifar100': 32}


def epochs(n: float, batch_size: int, train_examples: int) -> int:
  return round(n * train_examples / batch_size)


# BEiT's public releases (microsoft/unilm beit/README.md; MOOD's README links the same files).
# The .pth files use timm's BEiT names, which `python -m mood_jax.convert` reads.
BEIT_RELEASE = 'https://github.com/addf400/files/releases/download/v1.0/'
WEIGHTS_DIR = '~/mood_jax_weights'  # where the paper configs look for converted checkpoints
PT22K = 'beit_large_patch16_224_pt22k'  # self-supervised on ImageNet-22k (visual tokens)


def use_public_weights(config: ml_collections.ConfigDict, release: str,
                       convert_flags: str) -> None:
  """Start from BEiT's `release`, converted into WEIGHTS_DIR (the run names the command)."""
  config.finetune.update(init_from=os.path.join(WEIGHTS_DIR, release),
                         init_url=BEIT_RELEASE + release + '.pth',
                         init_convert_flags=convert_flags)


def paper_config(name: str, train_examples: int, ood_sets: tuple[str, ...],
                 opts: dict) -> ml_collections.ConfigDict:
  """The MOOD recipe on any real ID dataset; the per-dataset configs set name and OOD sets.
  opts: 'smoke' (tiny), 'from_scratch' (our MIM pretraining instead of BEiT's weights)."""
  config = runpy.run_path(os.path.join(_HERE, 'digits.py'))['get_config']('')
  data = config.data
  data.name = name
  data.data_dir = '~/tensorflow_datasets'  # tfds' own default, where `tfds build` writes
  data.id_classes = ()                      # all classes
  data.ood_sets = ood_sets
  data.image_size = 224                     # MOOD: BEiT at 224x224
  data.mean, data.std = 0.5, 0.5            # BEiT fine-tuning normalisation (MOOD keeps it)
  data.crop_scale = (0.08, 1.0)             # BEiT/timm RandomResizedCrop default
  data.randaugment_ops = 2                  # BEiT fine-tune --aa rand-m9-mstd0.5-inc1
  data.randaugment_magnitude = 9.0
  data.random_erasing = 0.25                # BEiT fine-tune --reprob 0.25
  data.eval_crop_fraction = 0.875           # BEiT eval at 224: resize 256, centre crop 224
  # OpenOOD brings every image of a CIFAR benchmark, ID and OOD, to 32 px first
  # (openood/evaluation_api/preprocessor.py: pre_size = img_size = 32): TinyImageNet, Textures
  # and Places would otherwise arrive sharper than the upsampled CIFAR images.
  data.native_size = OPENOOD_NATIVE_SIZES.get(name, 0)
  data.num_workers = 8                      # ours: keeps an accelerator host fed (benchmarks/)

  # MOOD's README: fine-tune beit_large_patch16_224_pt22k; its run_class_finetuning.py copies
  # the checkpoint's shared relative position table into every block (--rel_pos_per_block).
  config.stages = 'finetune,evaluate'
  use_public_weights(config, PT22K, '--rel_pos_per_block')

  config.model.update(
      variant='L/16',          # MOOD: beit_large_patch16_224
      posemb='none', rel_pos_bias='block',  # BEiT: relative position bias per block, no abs.
      qkv_bias='qv',           # BEiT: q, v biases
      layer_scale=1e-5,        # BEiT README: LayerScale init 0.1 for base, 1e-5 for large
                               # (converted weights bring their own gammas)
      pool='mean',             # BEiT/MOOD features: mean of patch tokens + LayerNorm
      dtype='auto')            # bfloat16 compute on GPU/TPU, float32 on CPU (BEiT, hence MOOD,
                               # fine-tunes under torch.cuda.amp.autocast: 16-bit compute too)

  # Pretraining runs only in the from_scratch preset: BEiT's recipe, pixel targets.
  config.pretrain.update(
      scheme='blockwise',      # BEiT: masking_generator.py
      mask_ratio=75 / 196,     # BEiT README: --num_mask_patches 75 of the 14x14 grid
      min_block_patches=16,    # BEiT run_beit_pretraining.py --min_mask_patches_per_block 16
      decoder_width=512, decoder_depth=8, decoder_heads=16,  # MAE's light decoder (ours: pixels)
      drop_path=0.1,           # BEiT pretraining: stochastic depth 0.1
      batch_size=2048,         # BEiT
      num_steps=epochs(800, 2048, train_examples),   # BEiT: 800 epochs
      warmup_steps=epochs(10, 2048, train_examples),  # BEiT: 10 warmup epochs
      lr=1.5e-3, weight_decay=0.05, b1=0.9, b2=0.999,  # BEiT
      grad_clip=3.0,           # BEiT README: --clip_grad 3.0
      min_lr=1e-5, log_every=100, ckpt_every=2000)

  # BEiT pretraining (datasets.py DataAugmentationForBEiT): ColorJitter(0.4, 0.4, 0.4), then
  # flip and random resized crop; no RandAugment or erasing. (A string where digits.py has a
  # bool: True, False or 'crop'; see input_pipeline.train_transforms.)
  data.color_jitter = 0.4
  del config.pretrain.augment
  config.pretrain.augment = 'crop'

  config.finetune.update(
      batch_size=128,          # MOOD: 8 per GPU x 8 GPUs x update_freq 2
      num_steps=epochs(100, 128, train_examples),    # MOOD: --epochs 100
      warmup_steps=epochs(5, 128, train_examples),   # MOOD: --warmup_epochs 5
      lr=2e-5,                 # MOOD: --lr 2e-5
      layer_decay=0.9,         # MOOD: --layer_decay 0.9
      drop_path=0.4,           # MOOD: --drop_path 0.4
      weight_decay=1e-8,       # MOOD: --weight_decay 1e-8
      label_smoothing=0.1,     # BEiT run_class_finetuning default --smoothing 0.1
      b1=0.9, b2=0.999,        # BEiT fine-tuning AdamW
      min_lr=1e-6,             # BEiT run_class_finetuning default --min_lr 1e-6
      log_every=100, ckpt_every=2000,
      eval_every=epochs(1, 128, train_examples))  # BEiT run_class_finetuning.py: every epoch

  config.logit_ft.update(
      loss='um', gamma_from='masked_model',
      weight_keep_ratio=0.965,  # Unleashing Mask's k (method.md, um.md)
      batch_size=128, num_steps=epochs(10, 128, train_examples),  # ours: a short continuation
      warmup_steps=0, lr=2e-5, layer_decay=0.9,  # as finetune
      drop_path=0.4, weight_decay=1e-8,
      log_every=100, ckpt_every=2000, eval_every=epochs(1, 128, train_examples))

  config.evaluate.update(
      scorers='mahalanobis_mood,msp,energy,maxlogit,vim,knn',  # MOOD's own + MOODv2's ViM
      sweep='',                # no validation OOD set by default; see docs/datasets.md
      id_train_augment=True,   # MOOD eval_with_features.py: the ID bank with train transforms
      batch_size=256, plots=True)

  if 'from_scratch' in opts:
    config.stages = 'pretrain,finetune,evaluate'
    config.finetune.update(init_from='pretrain', init_url='', init_convert_flags='')

  if 'smoke' in opts:
    config.model.variant = 'mu/8'
    data.image_size, data.num_workers = 16, 0
    for stage in (config.pretrain, config.finetune, config.logit_ft):
      stage.update(num_steps=2, batch_size=16, warmup_steps=1, log_every=2, ckpt_every=2)
    config.finetune.eval_every = config.logit_ft.eval_every = 0
    config.pretrain.update(min_block_patches=1, decoder_width=32, decoder_depth=1,
                           decoder_heads=2)
    config.evaluate.update(batch_size=32, plots=False, scorers='mahalanobis_mood,msp')
  return config


def options(arg: str, valid: tuple[str, ...], path: str) -> dict[str, str]:
  """'a,b=1' -> {'a': '', 'b': '1'}; unknown options are an error naming the valid ones."""
  parsed = dict(opt.partition('=')[::2] for opt in arg.split(',') if opt)
  unknown = set(parsed) - set(valid)
  if unknown:
    raise ValueError(f'unknown {path} options {sorted(unknown)}: use {", ".join(valid)}')
  return parsed


PRESETS = ('from_scratch', 'smoke')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  opts = options(arg, PRESETS, 'configs/cifar10.py')
  # OpenOOD v1.5's CIFAR-10 benchmark, its own image lists (`python -m mood_jax.data.prepare
  # openood:cifar10/LIST`): near = CIFAR-100, TinyImageNet; far = MNIST, SVHN, Textures,
  # Places365; its TinyImageNet validation list chooses hyperparameters only.
  config = paper_config('cifar10', _TRAIN_EXAMPLES, openood.all_sets('cifar10'), opts)
  config.data.validation_ood_sets = openood.sets('cifar10', 'validation')
  return config

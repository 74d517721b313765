"""The embedded default: scikit-learn's digits as ID, offline OOD sets; runs on a laptop CPU.

  --config=configs/digits.py            ID = all ten digits; OOD = the far sets
  --config=configs/digits.py:split      ID = digits 0-4; OOD = digits 5-9 (near) + the far sets
  --config=configs/digits.py:oneclass=3 ID = digit 3 alone: MIM pretrain, then score its encoder
  --config=configs/digits.py:oneclass=all  each digit alone in turn, then the mean over digits
  --config=configs/digits.py:smoke      a seconds-long run for tests (combine: split,smoke)
  --config=configs/digits.py:split,idval,nearval=9  no choice reads a test split: 20% of ID
                                        train is 'id_val' (never trained on), the ID side of
                                        every validation score; digit 9's train images are a
                                        near-OOD validation set, digits 5-8 the near test set
"""

import ml_collections
from ml_collections import config_dict

from mood_jax.data import data_config
from mood_jax.data.sources import embedded
from mood_jax.stages import evaluate

FAR_OOD = embedded.FAR_OOD_SETS
# Scored and reported as group 'validation'; they choose scorer hparams (evaluate.sweep).
VALIDATION_OOD = embedded.VALIDATION_OOD_SETS


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  options = dict(opt.partition('=')[::2] for opt in arg.split(',') if opt)
  unknown = set(options) - {'split', 'oneclass', 'smoke', 'idval', 'nearval'}
  if unknown:
    raise ValueError(f'unknown configs/digits.py options {sorted(unknown)}: '
                     'use split, oneclass=C (or all), smoke, idval, nearval=C')
  if 'nearval' in options and 'split' not in options:
    raise ValueError('configs/digits.py option nearval=C holds out a digit outside split\'s '
                     'ID classes 0-4: use split,nearval=C')
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = 'pretrain,finetune,logit_ft,evaluate'
  # True: each of data.id_classes (all when empty) alone is ID in turn, one run per class in
  # WORKDIR/class_<c>/, and WORKDIR/results/ is the mean over them (MOOD's one-class tables).
  config.one_class_each = False
  # Axis names say the strategy: (('data', 4), ('fsdp', 2)) adds FSDP; see mood_jax/parallel.py.
  config.mesh = (('data', -1),)
  # (regex, spec) pairs that override the mesh's placement of matching params, first match
  # wins: e.g. (('pos_embedding', ()), ('fc[12]/kernel', (None, 'fsdp'))). See parallel.py.
  config.sharding_rules = ()
  # Compile every stage's step from abstract inputs and print memory and FLOPs, then stop;
  # dry_run_devices=N compiles for N fake CPU devices (e.g. a pod's mesh on a laptop).
  config.dry_run = False
  config.dry_run_devices = 0
  # When things go wrong (README, "When things go wrong"), each ends the run with status 42
  # (launchers rerun it; it resumes): a process of a multi-process run that gives no sign of
  # life for peer_timeout_s is lost, and the others stop; no training step, evaluation batch
  # or scorer fit for stall_timeout_s (0: no watchdog) dumps every thread's stack. At start, a
  # process waits coordinator_timeout_s to join the run (then status 1, naming the address).
  config.peer_timeout_s = 30
  config.stall_timeout_s = 1800
  config.coordinator_timeout_s = 300
  # 'START,COUNT': a jax.profiler trace of steps START to START + COUNT - 1 of each training
  # stage in WORKDIR/tensorboard/profile/, for TensorBoard's profile plugin (mood_jax/train/utilisation.py).
  config.profile_steps = ''

  config.data = data_config.default_data_config()
  config.data.id_classes = tuple(range(10))
  config.data.ood_sets = (*FAR_OOD, *VALIDATION_OOD)
  config.model = dict(
      variant='mu/4', posemb='learn', pool='mean',  # posemb 'none': relative bias only
      qkv_bias='qkv',           # 'qv': BEiT's q and v biases, none on k; or 'none'
      layer_scale=config_dict.placeholder(float),  # LayerScale init value (BEiT: 0.1)
      rel_pos_bias='none',      # 'block' (a table per block) or 'shared' (one, BEiT's option)
      dtype='float32',          # compute dtype (params stay float32): 'auto' is bfloat16 on
                                # GPU/TPU, float32 on CPU (the paper configs' choice)
      attention='auto',         # 'einsum' or 'fused' (jax.nn.dot_product_attention); 'auto':
                                # fused on GPU/TPU, einsum on CPU (faster there, README)
      remat=False,              # recompute block activations in the backward pass
      scan=False,               # lax.scan over the blocks: one block to compile, same params
  )

  config.pretrain = dict(
      scheme='random',          # 'random' (MAE) or 'blockwise' (BEiT)
      mask_ratio=0.75,          # BEiT's blockwise uses ~0.4
      min_block_patches=4,      # blockwise only: BEiT's 16 is for a 14x14 grid
      norm_pix=True,
      decoder_width=64, decoder_depth=2, decoder_heads=4,
      drop_path=0.0,
      augment=True,
      num_steps=600, batch_size=128,
      lr=1e-3, min_lr=1e-5, warmup_steps=100, weight_decay=0.05,
      b1=0.9, b2=0.95, grad_clip=0.0,
      log_every=50, ckpt_every=200, keep_checkpoints=2,
      grad_accum_steps=1,       # > 1: the batch in that many sequential micro-batches
  )
  config.finetune = dict(
      init_from='pretrain',     # or 'scratch', or a DIR from `python -m mood_jax.convert`
      init_url='',              # DIR only: where its public weights are (named if DIR is missing)
      init_convert_flags='',    # DIR only: the convert flags beyond --variant, --image_size
      drop_path=0.1,
      label_smoothing=0.1,
      augment=True,
      num_steps=400, batch_size=128,
      lr=2e-3, min_lr=1e-5, warmup_steps=50, weight_decay=0.05, layer_decay=0.9,  # MOOD's ld
      b1=0.9, b2=0.999, grad_clip=0.0,
      log_every=50, ckpt_every=100, keep_checkpoints=2,
      grad_accum_steps=1,       # > 1: the batch in that many sequential micro-batches
      # Every eval_every steps (0: never): ID test accuracy and eval_scorer's AUROC on each
      # validation OOD set (mood_jax/train/periodic_eval.py), in the log and TensorBoard.
      eval_every=100, eval_scorer='msp',
  )
  # UM's loss (flooding) by default, as the paper. Recorded on the 'letters' OOD validation
  # set (seed 0; mean AUROC of msp, energy and mahalanobis_mood): um flooding 83.7 at keep
  # 0.999, down to 75.8 at 0.98 (UM's own keep ratio, 0.965: 81.1, with ID accuracy 74%);
  # our sample_mask at keep 0.99 88.5, plain CE 88.9 (recorded with gamma on clean images,
  # gamma_transforms='eval', before 'train' became the default). A masked copy of this
  # 0.5M-param model loses far more than UM's CIFAR nets, hence a keep ratio closer to 1.
  config.logit_ft = dict(
      loss='um',                # 'um' (flooding, UM's), 'sample_mask' (ours), or 'ce' (none)
      gamma_from='masked_model',  # 'masked_model', 'quantile' or 'fixed' (loss='um' only)
      weight_keep_ratio=0.999,  # masked copy for gamma and sample_mask (UM's k is 0.965)
      gamma_quantile=0.5,       # gamma_from='quantile' only
      gamma=0.0,                # gamma_from='fixed' only
      # ID train for gamma, one pass, model in eval mode: 'train', through this stage's own
      # training transforms (UM's estimate_loss.py), or 'eval', un-augmented.
      gamma_transforms='train',
      beta=1.0,
      label_smoothing=0.1,      # as finetune, so that loss='ce' is a plain continuation
      sample_mask_ratio=0.1,    # loss='sample_mask': fraction of each batch dropped
      teacher_alpha=1.0,        # < 1: targets alpha * one_hot + (1 - alpha) * teacher (Li et al. 0.9)
      init_step=-1,             # finetune checkpoint to start from: -1 its last, or a saved step
      umap='none',              # 'none', 'scores' (weights frozen) or 'both': learned top-k masks
      umap_keep_ratio=0.8,
      trainable='all',          # 'all', 'head' or 'last_n_blocks'
      last_n_blocks=1,
      drop_path=0.1,
      augment=True,
      num_steps=200, batch_size=128,
      optimizer='adamw',        # or 'sgd' (momentum SGD, UM's: configs/cifar10_um.py)
      lr=5e-4, min_lr=1e-5, warmup_steps=20, weight_decay=0.05, layer_decay=1.0,
      b1=0.9, b2=0.999, momentum=0.9,  # b1, b2: adamw; momentum: sgd
      grad_clip=0.0,
      log_every=50, ckpt_every=100, keep_checkpoints=2,
      grad_accum_steps=1,       # > 1: the batch in that many sequential micro-batches
      eval_every=100, eval_scorer='msp',  # as finetune's
  )
  config.evaluate = dict(
      models='auto',            # 'auto' (every trained classifier) or a list of pretrain
                                # (encoder features only), converted (finetune.init_from's
                                # weights as converted), finetune, logit_ft, random_init
                                # (an untrained encoder: pretrain's control)
      scorers='mahalanobis_mood,msp,energy,maxlogit',  # or 'all'; see mood_jax/ood/scorers/
      hparams=evaluate.hparams_config(),  # e.g. --config.evaluate.hparams.knn.k=10
      # Scorers whose hparams are chosen on the 'validation' OOD sets in data.ood_sets
      # ('letters') against a held-out part of ID train: 'all' (each selected scorer with a
      # grid below), a comma-separated list, or '' (none: evaluate.hparams as set).
      sweep='all',
      sweep_grids=dict(         # OpenOOD v1.5's grids, with dims and k sized for digits
          knn=dict(k=(1, 5, 10, 20, 50, 100, 200)),
          react=dict(percentile=(85, 90, 95, 99)),
          ash_p=dict(percentile=(65, 70, 75, 80, 85, 90, 95)),
          ash_b=dict(percentile=(65, 70, 75, 80, 85, 90, 95)),
          ash_s=dict(percentile=(65, 70, 75, 80, 85, 90, 95)),
          gen=dict(gamma=(0.01, 0.1, 0.5, 1., 2.), top_m=(2, 5, 10)),
          vim=dict(dim=(16, 32, 48, 64)),
          residual=dict(dim=(16, 32, 48, 64)),
          scale=dict(percentile=(65, 70, 75, 80, 85, 90, 95)),
          fdbd=dict(distance_as_normalizer=(True, False)),
          nci=dict(alpha=(0.0001, 0.001, 0.01, 0.1)),
          relation=dict(pow=(1, 2, 4, 6, 8)),
          nnguide=dict(k=(10, 20, 50, 100)),  # OpenOOD's list is k=100, alpha=0.01 only
      ),
      sweep_metric='auroc',
      sweep_id_fraction=0.2,    # of ID train, held out of the fit as ID validation
      # Scorers fitted on that held-out part instead of all ID train; OpenOOD v1.5 fits
      # react, klm and residual on ID validation: 'react,klm,residual'.
      fit_on_id_validation='',
      batch_size=256,
      plots=True,
      id_train_augment=False,   # True: the ID-train bank through the training transforms,
                                # one draw per image (MOOD's eval_with_features.py)
      # WORKDIR/detector/, for `python -m mood_jax.score` and mood_jax.detector.Detector:
      # one model with its scorers ('auto': the best pair on the validation OOD sets by
      # sweep_metric), and OOD thresholds at these ID true-positive rates.
      detector=dict(write=True, model='auto', scorers='auto', tprs=(0.95,)),
  )

  if 'split' in options:
    config.data.id_classes = (0, 1, 2, 3, 4)
    config.data.ood_sets = ('digits_heldout', *FAR_OOD, *VALIDATION_OOD)
  if 'idval' in options:
    config.data.id_val_fraction = 0.2
  if 'nearval' in options:
    config.data.heldout_validation_classes = (int(options['nearval']),)
    config.data.ood_sets = (*config.data.ood_sets, embedded.HELDOUT_VALIDATION_SET)
  if 'oneclass' in options:
    config.one_class_each = options['oneclass'] == 'all'
    config.data.id_classes = () if config.one_class_each else (int(options['oneclass']),)
    config.data.ood_sets = ('digits_heldout', *FAR_OOD, *VALIDATION_OOD)
    config.stages = 'pretrain,evaluate'
    config.evaluate.models = 'pretrain'
    config.evaluate.scorers = 'mahalanobis_mood'
  if 'smoke' in options:
    config.model.variant = 'mu/8'
    config.data.image_size = 16
    config.data.ood_examples_per_set = 64
    for stage in (config.pretrain, config.finetune, config.logit_ft):
      stage.num_steps, stage.batch_size, stage.warmup_steps = 4, 16, 1
      stage.log_every, stage.ckpt_every = 2, 2
    config.finetune.eval_every = config.logit_ft.eval_every = 0
    config.evaluate.batch_size = 64
    config.evaluate.plots = False
  return config

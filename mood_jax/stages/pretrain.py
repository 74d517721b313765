"""Stage 1: masked-image-modeling pretraining (pixel reconstruction) on ID images."""

import jax
import jax.numpy as jnp
import ml_collections

from mood_jax import config_checks
from mood_jax.train import loop as train_loop, optim, stage as training_stage
from mood_jax.data import catalogue
from mood_jax.models import masking, mim, vit


NAME = 'pretrain'
RNG_STREAMS = {'step': 1}  # training_stage.rng_stream


def check_config(config: ml_collections.ConfigDict) -> None:
  """This stage's config errors, before anything runs (after vit.check_config)."""
  cfg = config.pretrain
  config_checks.choice('pretrain.scheme', cfg.scheme, masking.SCHEMES)
  if cfg.scheme in masking.DROPS_PATCHES:
    vit.check_every_patch_seen(config.model.rel_pos_bias)
  config_checks.inside('pretrain.mask_ratio', cfg.mask_ratio, 0, 1, 0.75)
  num_patches = (config.data.image_size // vit.parse_variant(config.model.variant)['patch_size'])**2
  num_masked = int(round(num_patches * cfg.mask_ratio))  # as masking.batch_masks rounds
  if not 1 <= num_masked < num_patches:  # no target, or no visible patch
    config_checks.fail('pretrain.mask_ratio', cfg.mask_ratio, f'masks {num_masked} of the '
                       f'{num_patches} patches: mask at least one and keep at least one', 0.75)
  if cfg.scheme == 'blockwise':  # smaller blocks than this would never be drawn
    config_checks.inside('pretrain.min_block_patches', cfg.min_block_patches, 1, num_masked,
                         min(4, num_masked), closed='both')
  for name, example in (('decoder_width', 64), ('decoder_depth', 2), ('decoder_heads', 4)):
    config_checks.at_least(f'pretrain.{name}', cfg[name], 1, example)


def _make_loss_fn(model, cfg: ml_collections.ConfigDict) -> training_stage.LossFn:
  """Pixel reconstruction of the masked patches; aux holds the masks drawn."""
  patch = model.encoder.patch_size

  def loss_fn(params, batch, rng):
    grid = (batch['image'].shape[1] // patch, batch['image'].shape[2] // patch)
    # Separate streams: masks stay the same if drop-path settings change.
    mask_rng, dropout_rng = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
    masks = masking.batch_masks(
        mask_rng, jnp.arange(batch['image'].shape[0]), scheme=cfg.scheme, grid=grid,
        mask_ratio=cfg.mask_ratio, min_block=cfg.min_block_patches)
    pred = model.apply({'params': params}, batch['image'], masks, train=True,
                       rngs={'dropout': dropout_rng})
    loss = mim.mim_loss(pred, batch['image'], masks['mask'], patch, cfg.norm_pix)
    return loss, {'masked_fraction': masks['mask'].mean(), 'mask': masks['mask']}

  return loss_fn


def describe(config: ml_collections.ConfigDict) -> training_stage.TrainingStage:
  """The pretraining step: the masked image model (encoder and pixel decoder), its masks
  drawn per step (`pretrain.scheme`), and the loss on the masked patches (`config.pretrain`)."""
  cfg = config.pretrain
  size, channels = config.data.image_size, catalogue.source(config.data).channels
  encoder = vit.encoder_from_config(config.model, drop_path=cfg.drop_path)
  model = mim.MaskedImageModel(encoder, scheme=cfg.scheme, num_channels=channels,
                               decoder_width=cfg.decoder_width, decoder_depth=cfg.decoder_depth,
                               decoder_heads=cfg.decoder_heads)
  grid = (size // encoder.patch_size,) * 2
  dummy_masks = jax.eval_shape(lambda: masking.batch_masks(
      jax.random.key(0), jnp.arange(1), scheme=cfg.scheme, grid=grid,
      mask_ratio=cfg.mask_ratio, min_block=cfg.min_block_patches))

  def init_params():
    masks = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dummy_masks)
    return model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, channels)),
                      masks)['params']

  return training_stage.TrainingStage(
      name=NAME, cfg=cfg, model=model, init_params=init_params,
      tx=optim.make_optimizer(cfg, encoder.depth), lr_schedule=optim.make_schedule(cfg),
      loss_fn=_make_loss_fn(model, cfg),
      rng=training_stage.rng_stream(config.seed, RNG_STREAMS['step']))


def run(config: ml_collections.ConfigDict, workdir: str, placement, later_images: int = 0) -> None:
  """Pretrains the encoder by masked-image modeling on the ID training images, resuming
  from WORKDIR/ckpt/pretrain; `later_images` is for the run's ETA (train_loop.train)."""
  train_loop.train(describe(config), config, workdir, placement, later_images=later_images)

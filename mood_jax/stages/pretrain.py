"""Stage 1: masked-image-modeling pretraining (pixel reconstruction) on ID images."""

import jax
import jax.numpy as jnp
import ml_collections

from mood_jax import config_checks, optim, train_loop
from mood_jax.data import catalogue, input_pipeline
from mood_jax.errors import UserError
from mood_jax.models import masking, mim, vit

NAME = 'pretrain'


def check_config(config: ml_collections.ConfigDict) -> None:
  """This stage's config errors, before anything runs (after vit.check_config)."""
  cfg = config.pretrain
  config_checks.choice('pretrain.scheme', cfg.scheme, ['random', 'blockwise'])
  if cfg.scheme == 'random' and config.model.rel_pos_bias != 'none':
    raise UserError('model.rel_pos_bias needs every patch in the encoder, which MAE-style '
                    'random masking drops: use --config.pretrain.scheme=blockwise')
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


def setup(config: ml_collections.ConfigDict):
  """(model, init_params, optimizer, lr schedule) of this stage; shared with its consumers."""
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

  return model, init_params, optim.make_optimizer(cfg, encoder.depth), optim.make_schedule(cfg)


def make_loss_fn(model, cfg: ml_collections.ConfigDict) -> train_loop.LossFn:
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
    return loss, {'masked_fraction': masks['mask'].mean()}

  return loss_fn


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
  cfg = config.pretrain
  model, init_params, tx, schedule = setup(config)
  data = input_pipeline.train_dataset(config.data, global_batch_size=cfg.batch_size,
                                      seed=config.seed, augment=cfg.augment)
  train_loop.train(NAME, cfg, config, workdir, init_params=init_params,
                   loss_fn=make_loss_fn(model, cfg), tx=tx, lr_schedule=schedule,
                   data_iter=iter(data), mesh=mesh,
                   rng=jax.random.fold_in(jax.random.key(config.seed), 1))

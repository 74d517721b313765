"""Masked image modeling: pixel reconstruction of masked patches.

Two schemes share the encoder of `vit.py`:
  'blockwise' (BEiT/SimMIM): masked patches become a mask token inside the
      encoder; a linear head predicts every patch's pixels from its token.
  'random' (MAE): the encoder sees the visible patches only; a light decoder
      gets the visible tokens plus mask tokens, unshuffled to patch order.
The loss counts masked patches only, against per-patch normalised pixels.
"""

import flax.linen as nn
import jax.numpy as jnp

from mood_jax.models import masking, vit


def patchify(images, patch_size: int):
  """[B, H, W, C] -> [B, N, p*p*C], patches in row-major order."""
  batch, height, width, channels = images.shape
  p = patch_size
  x = images.reshape(batch, height // p, p, width // p, p, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, (height // p) * (width // p), p * p * channels)


def mim_loss(pred, images, mask, patch_size: int, norm_pix: bool = True):
  """Mean squared error over masked patches; `pred` is [B, N, p*p*C]."""
  target = patchify(images, patch_size)
  if norm_pix:  # MAE's per-patch normalisation: a sharper target than raw pixels
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  mask = mask.astype(per_patch.dtype)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class Decoder(nn.Module):
  """MAE's light decoder: [B, 1+n_visible, D] tokens -> [B, N, p*p*C] pixels."""
  width: int
  depth: int
  num_heads: int
  num_patches: int
  patch_dim: int
  dtype: jnp.dtype = jnp.float32  # compute dtype, as the encoder's (see vit.py)
  attention: str = 'einsum'       # as the encoder's

  @nn.compact
  def __call__(self, tokens, restore_ids):
    x = nn.Dense(self.width, dtype=self.dtype, name='embed')(tokens)
    batch, visible = x.shape[0], x.shape[1] - 1
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
    masked = jnp.broadcast_to(mask_token, (batch, self.num_patches - visible, self.width))
    patches = jnp.concatenate([x[:, 1:], masked], axis=1)
    patches = jnp.take_along_axis(patches, restore_ids[..., None], axis=1)
    grid = int(round(self.num_patches ** 0.5))
    patches = patches + jnp.asarray(vit.sincos_posemb_2d(grid, self.width))[None]
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    for i in range(self.depth):
      x = vit.Block(self.num_heads, 4 * self.width, dtype=self.dtype, attention=self.attention,
                    name=f'block{i}')(x)
    x = nn.LayerNorm(name='norm')(x)
    return nn.Dense(self.patch_dim, name='pred')(x[:, 1:])


class MaskedImageModel(nn.Module):
  """Encoder + reconstruction head; returns pixel predictions [B, N, p*p*C]."""
  encoder: vit.Encoder
  scheme: str
  num_channels: int
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4

  @nn.compact
  def __call__(self, images, masks: dict, *, train: bool = False):
    patch_dim = self.encoder.patch_size ** 2 * self.num_channels
    if self.scheme == 'blockwise':
      tokens = self.encoder(images, mask=masks['mask'], train=train)
      tokens = nn.LayerNorm(name='norm')(tokens)
      return nn.Dense(patch_dim, name='pred')(tokens[:, 1:])
    if self.scheme == 'random':
      tokens = self.encoder(images, keep_ids=masks['keep_ids'], train=train)
      tokens = nn.LayerNorm(name='norm')(tokens)
      return Decoder(self.decoder_width, self.decoder_depth, self.decoder_heads,
                     num_patches=masks['mask'].shape[-1], patch_dim=patch_dim,
                     dtype=self.encoder.dtype, attention=self.encoder.attention,
                     name='decoder')(tokens, masks['restore_ids'])
    raise ValueError(f'unknown masking scheme {self.scheme!r}: use one of {masking.SCHEMES}')

"""Patch masks for masked image modeling, one example at a time (vmap for a batch).

Both generators are pure functions of a PRNG key with static output shapes, so they
run inside the jitted train step. The caller derives one key per example from the
example's global index, which makes masks independent of how the batch is sharded.
"""

import math

import jax
import jax.numpy as jnp

# 'blockwise': BEiT's, the encoder sees mask tokens; 'random': MAE's, it sees only the
# visible patches (`DROPS_PATCHES`).
SCHEMES = ('blockwise', 'random')
DROPS_PATCHES = ('random',)


def random_mask(key, num_patches: int, mask_ratio: float):
  """MAE masking: a uniformly random subset of exactly round(N * ratio) patches.

  Returns (mask [N] bool, True = masked; keep_ids [N - num_masked] int32, the
  visible patches in shuffled order; restore_ids [N] int32, the permutation that
  puts [visible, masked] tokens back in patch order).
  """
  num_keep = num_patches - int(round(num_patches * mask_ratio))
  shuffle = jnp.argsort(jax.random.uniform(key, (num_patches,)))
  restore_ids = jnp.argsort(shuffle).astype(jnp.int32)
  mask = restore_ids >= num_keep  # rank in the shuffle decides visibility
  return mask, shuffle[:num_keep].astype(jnp.int32), restore_ids


def blockwise_mask(key, grid: tuple[int, int], num_masked: int, min_block: int,
                   max_block: int | None = None, aspect_range=(0.3, 1 / 0.3),
                   max_tries: int = 10):
  """BEiT blockwise masking: rectangles until `num_masked` patches are covered.

  Follows BEiT's generator (microsoft/unilm beit/masking_generator.py): each try
  draws an area uniformly between min_block and the patches still to mask (below
  min_block once fewer remain, as Python's random.uniform(a, b) with b < a does
  there) and a log-uniform aspect ratio; a rectangle that fits inside the grid and adds
  between 1 and `remaining` new patches is accepted. After `max_tries`
  consecutive failures it stops, so the count is <= num_masked. Returns a [H*W]
  bool mask.
  """
  height, width = grid
  max_block = num_masked if max_block is None else max_block
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]

  def attempt(state):
    mask, count, failures, key = state
    key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    budget = jnp.minimum(num_masked - count, max_block)
    area = min_block + (budget - min_block) * jax.random.uniform(k_area)
    aspect = jnp.exp(jax.random.uniform(k_aspect, minval=log_lo, maxval=log_hi))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, jnp.maximum(height - h, 0) + 1)
    left = jax.random.randint(k_left, (), 0, jnp.maximum(width - w, 0) + 1)
    rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    added = jnp.sum(rect & ~mask)
    accept = (h < height) & (w < width) & (added > 0) & (added <= budget)
    mask = jnp.where(accept, mask | rect, mask)
    return (mask, count + jnp.where(accept, added, 0),
            jnp.where(accept, 0, failures + 1), key)

  def keep_going(state):
    _, count, failures, _ = state
    return (count < num_masked) & (failures < max_tries)

  init = (jnp.zeros((height, width), bool), jnp.int32(0), jnp.int32(0), key)
  mask, *_ = jax.lax.while_loop(keep_going, attempt, init)
  return mask.reshape(-1)


def batch_masks(key, example_ids, *, scheme: str, grid: tuple[int, int],
                mask_ratio: float, min_block: int):
  """Masks for a batch; each example's mask depends only on (key, its id)."""
  num_patches = grid[0] * grid[1]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
  if scheme == 'random':
    mask, keep_ids, restore_ids = jax.vmap(
        lambda k: random_mask(k, num_patches, mask_ratio))(keys)
    return {'mask': mask, 'keep_ids': keep_ids, 'restore_ids': restore_ids}
  if scheme == 'blockwise':
    num_masked = int(round(num_patches * mask_ratio))
    return {'mask': jax.vmap(lambda k: blockwise_mask(k, grid, num_masked, min_block))(keys)}
  raise ValueError(f'unknown masking scheme {scheme!r}: use one of {SCHEMES}')

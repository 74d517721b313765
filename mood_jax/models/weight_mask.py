"""Weight masks as pure transforms of a param tree (Unleashing Mask).

A mask tree holds one array per masked kernel, at the kernel's path; every other
parameter passes through unchanged. Two kinds:
- `random_masks`: a fixed random fraction of each kernel zeroed, the "masked copy" whose
  loss estimates UM's constraint gamma;
- `straight_through_masks`: UMAP's learned masks, top-k of |scores| forward and, backward,
  the mask's gradient passed straight through to |scores| (so to the scores times their sign).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

PathFilter = Callable[[tuple[str, ...]], bool]


def kernel_paths(params, select: PathFilter = lambda path: True) -> list[tuple[str, ...]]:
  """Paths of the dense/conv kernels (every `kernel` leaf) that `select` accepts."""
  return [path for path in traverse_util.flatten_dict(params)
          if path[-1] == 'kernel' and select(path)]


def num_kept(size: int, keep_ratio: float) -> int:
  return max(1, round(keep_ratio * size))


def topk_mask(scores: jax.Array, keep_ratio: float) -> jax.Array:
  """1.0 at the `num_kept` largest |scores| of the tensor, 0.0 elsewhere: an exact count.

  Ties are broken by position (stable sort), so the count never drifts.
  """
  flat = jnp.abs(scores).reshape(-1)
  kept = jnp.argsort(-flat, stable=True)[:num_kept(flat.size, keep_ratio)]
  return jnp.zeros(flat.shape, scores.dtype).at[kept].set(1).reshape(scores.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def straight_through_topk(scores: jax.Array, keep_ratio: float) -> jax.Array:
  """`topk_mask` forward; backward, the gradient passes straight through to |scores|.

  UM ranks and differentiates |s| (Unleashing-Mask utils/conv_type.py: `GetSubnet` gets
  `scores.abs()`, and its backward returns g unchanged), so the gradient reaching s is
  g * sign(s): a weight that helps gains |s| whatever the sign of its score. A custom VJP
  rather than `hard + |s| - stop_gradient(|s|)`, whose forward is off by a rounding error
  wherever (hard + |s|) - |s| != hard in floating point.
  """
  return topk_mask(scores, keep_ratio)


def _straight_through_fwd(scores, keep_ratio):
  return topk_mask(scores, keep_ratio), jnp.sign(scores)


def _straight_through_bwd(keep_ratio, sign, grad):
  del keep_ratio
  return (grad * sign,)


straight_through_topk.defvjp(_straight_through_fwd, _straight_through_bwd)


def straight_through_masks(scores, keep_ratio: float):
  """UMAP's masks for a tree of scores (edge-popup's straight-through estimator)."""
  return jax.tree.map(lambda s: straight_through_topk(s, keep_ratio), scores)


def random_masks(key: jax.Array, params, keep_ratio: float,
                 select: PathFilter = lambda path: True):
  """Per selected kernel, a mask keeping exactly `num_kept` weights chosen at random
  (the top-k of uniform scores, as UM's estimate_loss does)."""
  flat = traverse_util.flatten_dict(params)
  paths = kernel_paths(params, select)
  keys = jax.random.split(key, len(paths))
  return traverse_util.unflatten_dict({
      path: topk_mask(jax.random.uniform(k, flat[path].shape), keep_ratio).astype(
          flat[path].dtype)
      for path, k in zip(paths, keys)})


def init_scores(key: jax.Array, params, select: PathFilter):
  """UMAP's scores: kaiming-uniform tensors shaped like the selected kernels."""
  flat = traverse_util.flatten_dict(params)
  paths = kernel_paths(params, select)
  keys = jax.random.split(key, len(paths))
  init = jax.nn.initializers.he_uniform()  # fan-in from axis -2: Dense and Conv kernels alike
  return traverse_util.unflatten_dict({
      path: init(k, flat[path].shape, flat[path].dtype) for path, k in zip(paths, keys)})


def apply_masks(params, masks):
  """`params` with each kernel that has a mask multiplied by it."""
  flat = traverse_util.flatten_dict(params)
  for path, mask in traverse_util.flatten_dict(masks).items():
    flat[path] = flat[path] * mask
  return traverse_util.unflatten_dict(flat)

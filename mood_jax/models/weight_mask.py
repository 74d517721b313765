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
  """UMAP's scores: tensors shaped like the selected kernels, drawn from U(+-1/sqrt(fan_in)).

  That is UM's `nn.init.kaiming_uniform_(scores, a=math.sqrt(5))` (Unleashing-Mask
  utils/conv_type.py `SubnetConv`, utils/linear_type.py `SubnetLinear`): gain
  sqrt(2 / (1 + 5)) times sqrt(3 / fan_in). Not He-uniform's sqrt(6 / fan_in), 2.45x wider,
  under which the same gradient steps swap fewer weights in and out of the top-k. PyTorch's
  fan_in is the weight's in_features (Linear [out, in]) or in_channels * kh * kw (Conv
  [out, in, kh, kw]); a Flax kernel is [in, out] or [kh, kw, in, out], and variance_scaling's
  fan_in (axis -2 times the leading receptive-field axes) is that same number.
  """
  flat = traverse_util.flatten_dict(params)
  paths = kernel_paths(params, select)
  keys = jax.random.split(key, len(paths))
  # Bound sqrt(3 * scale / fan_in) = 1 / sqrt(fan_in).
  init = jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
  return traverse_util.unflatten_dict({
      path: init(k, flat[path].shape, flat[path].dtype) for path, k in zip(paths, keys)})


def apply_masks(params, masks):
  """`params` with each kernel that has a mask multiplied by it."""
  flat = traverse_util.flatten_dict(params)
  for path, mask in traverse_util.flatten_dict(masks).items():
    flat[path] = flat[path] * mask
  return traverse_util.unflatten_dict(flat)

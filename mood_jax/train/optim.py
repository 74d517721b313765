"""Optimizers from config: AdamW (or momentum SGD), warmup + cosine, layer-wise lr decay, no
AdamW decay on 1-D params."""

import re
from typing import Callable

import jax
import ml_collections
import optax

from mood_jax import config_checks

PathFilter = Callable[[str], bool]  # of a param's '/'-joined path

# Parameters that are embeddings rather than weights: never weight-decayed (BEiT/MAE).
_EMBEDDINGS = ('cls', 'pos_embedding', 'mask_token')


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def decay_mask(params):
  """True where weight decay applies: matrices and kernels, not biases/norms/embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and _path_str(path).split('/')[-1] not in _EMBEDDINGS, params)


def layer_id(path: str, depth: int) -> int:
  """BEiT's layer ids: 0 = patch embed/cls/pos, block i -> i + 1, the rest -> depth + 1."""
  # Searched, not matched: a stage may nest the classifier (e.g. logit_ft's 'model/...').
  if re.search(r'(^|/)encoder/(patch_embed|cls|pos_embedding|mask_token)', path):
    return 0
  block = re.search(r'(^|/)encoder/block(\d+)/', path)
  return int(block.group(2)) + 1 if block else depth + 1


def layer_decay_labels(params, depth: int, exempt: PathFilter = lambda path: False):
  """'layer<id>' per param; the params whose '/'-joined path `exempt` accepts are labelled
  as the top layer, so layer decay leaves their rate as it is."""
  def label(path, _):
    path = _path_str(path)
    return f'layer{depth + 1 if exempt(path) else layer_id(path, depth)}'
  return jax.tree_util.tree_map_with_path(label, params)


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.num_steps, cfg.warmup_steps + 1), end_value=cfg.min_lr)


OPTIMIZERS = ('adamw', 'sgd')


def check_config(stage: str, cfg: ml_collections.ConfigDict) -> None:
  config_checks.choice(f'{stage}.optimizer', cfg.get('optimizer', 'adamw'), OPTIMIZERS)


def _base_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`cfg.optimizer` (default 'adamw'): AdamW, decay off for biases and norms (BEiT's), or
  'sgd': momentum SGD with L2 weight decay on every param added to the gradient, as
  torch.optim.SGD in Unleashing Mask's utils/net_utils.py `get_optimizer`."""
  name = cfg.get('optimizer', 'adamw')
  if name == 'adamw':
    return optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                       weight_decay=cfg.weight_decay, mask=decay_mask)
  config_checks.choice('optimizer', name, OPTIMIZERS)  # for callers that skipped check_config
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(make_schedule(cfg), momentum=cfg.momentum))


def make_optimizer(cfg: ml_collections.ConfigDict, depth: int,
                   layer_decay_exempt: PathFilter = lambda path: False
                   ) -> optax.GradientTransformation:
  """The stage's optimizer, its update scaled per layer by layer_decay ** (depth + 1 - id),
  except for the params whose '/'-joined path `layer_decay_exempt` accepts.

  Scaling the whole AdamW update equals scaling the lr of that parameter group,
  weight-decay term included, which is what BEiT's param groups do.
  """
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      _base_optimizer(cfg),
  )
  if cfg.get('layer_decay', 1.0) == 1.0:
    return tx
  scales = {f'layer{i}': optax.scale(cfg.layer_decay ** (depth + 1 - i)) for i in range(depth + 2)}
  return optax.chain(tx, optax.multi_transform(
      scales, lambda params: layer_decay_labels(params, depth, layer_decay_exempt)))


def train_only(tx: optax.GradientTransformation,
               is_trainable: PathFilter) -> optax.GradientTransformation:
  """`tx` on the params whose '/'-joined path `is_trainable` accepts; the rest stay fixed
  (zero update, no optimizer state)."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'train' if is_trainable(_path_str(path)) else 'frozen', params)
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)

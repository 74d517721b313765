"""Layer-wise lr decay and weight-decay masks follow BEiT's conventions."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mood_jax.train import optim
from mood_jax.errors import UserError
from mood_jax.models import vit


def _classifier_params(depth=3):
  model = vit.Classifier(4, vit.Encoder(width=16, depth=depth, mlp_dim=32, num_heads=2,
                                        patch_size=4))
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']


def test_layer_ids():
  assert optim.layer_id('encoder/patch_embed/kernel', 3) == 0
  assert optim.layer_id('encoder/cls', 3) == 0
  assert optim.layer_id('encoder/pos_embedding', 3) == 0
  assert optim.layer_id('encoder/block0/attn/qkv/kernel', 3) == 1
  assert optim.layer_id('encoder/block2/norm1/scale', 3) == 3
  assert optim.layer_id('fc_norm/scale', 3) == 4
  assert optim.layer_id('head/kernel', 3) == 4


def test_weight_decay_mask():
  flat = {'/'.join(k.key for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(optim.decay_mask(_classifier_params()))}
  assert flat['encoder/block0/fc1/kernel'] and flat['head/kernel']
  assert flat['encoder/patch_embed/kernel']
  for name in ('encoder/block0/fc1/bias', 'encoder/cls', 'encoder/pos_embedding',
               'fc_norm/scale', 'encoder/block1/norm2/bias', 'head/bias'):
    assert not flat[name], name


def test_update_scale_is_layer_decay_power():
  depth, decay, lr = 3, 0.5, 0.1
  cfg = ml_collections.ConfigDict(dict(lr=lr, min_lr=lr, warmup_steps=0, num_steps=10,
                                       weight_decay=0.0, layer_decay=decay, b1=0.9, b2=0.999,
                                       grad_clip=0.0))
  params = jax.tree.map(lambda s: jnp.ones(s.shape), _classifier_params(depth))
  tx = optim.make_optimizer(cfg, depth)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step with constant gradients moves every entry by lr (times the scale).
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = '/'.join(k.key for k in path)
    expected = -lr * decay ** (depth + 1 - optim.layer_id(name, depth))
    np.testing.assert_allclose(u, expected, rtol=1e-4, err_msg=name)


def test_schedule_warms_up_then_decays():
  cfg = ml_collections.ConfigDict(dict(lr=1.0, min_lr=0.01, warmup_steps=10, num_steps=100))
  schedule = optim.make_schedule(cfg)
  assert schedule(0) == 0.0
  assert schedule(10) == pytest.approx(1.0)
  assert schedule(100) == pytest.approx(0.01)
  assert schedule(5) < schedule(10) and schedule(50) < schedule(10)


def test_sgd_is_torch_sgd_with_l2_weight_decay_and_momentum():
  """Two steps by hand, as torch.optim.SGD (UM's): buf = momentum * buf + g + wd * w,
  w -= lr * buf, on every param (a bias too); constant lr (no warmup, min_lr = lr)."""
  cfg = ml_collections.ConfigDict(dict(optimizer='sgd', lr=0.1, min_lr=0.1, warmup_steps=0,
                                       num_steps=10, momentum=0.9, weight_decay=0.01,
                                       grad_clip=0.0))
  tx = optim.make_optimizer(cfg, depth=1)
  params = {'head': {'bias': jnp.array([1., -2.])}}
  state = tx.init(params)
  w, buf = np.array([1., -2.]), np.zeros(2)
  for grad in (np.array([0.5, 0.25]), np.array([-1., 2.])):
    updates, state = tx.update({'head': {'bias': jnp.asarray(grad)}}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    buf = 0.9 * buf + grad + 0.01 * w
    w = w - 0.1 * buf
    np.testing.assert_allclose(params['head']['bias'], w, rtol=1e-6)


def test_unknown_optimizer_is_a_user_error_before_anything_runs():
  cfg = ml_collections.ConfigDict(dict(optimizer='lamb', grad_clip=0.0))
  with pytest.raises(UserError, match="unknown finetune.optimizer 'lamb': valid choices are "
                                      "adamw, sgd"):
    optim.check_config('finetune', cfg)

"""bfloat16 compute, remat, scan over blocks and gradient accumulation change the cost of a
step, not its result."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits
from mood_jax import parallel
from mood_jax.train import loop as train_loop
from mood_jax.models import masking, mim, vit
from mood_jax.stages import finetune

ENCODER = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)


def _loss_and_grads(model, params, images, labels):
  def loss(p):
    logits, _ = model.apply({'params': p}, images, train=True,
                            rngs={'dropout': jax.random.key(3)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return jax.value_and_grad(loss)(params)


@pytest.fixture
def batch():
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
  return images, jnp.arange(8) % 5


BEIT = dict(posemb='none', qkv_bias='qv', layer_scale=0.1, rel_pos_bias='block')


@pytest.mark.parametrize('options', [dict(remat=True), dict(scan=True),
                                     dict(scan=True, remat=True)], ids=str)
@pytest.mark.parametrize('beit', [False, True], ids=['vit', 'beit'])
def test_remat_and_scan_keep_the_params_loss_and_gradients(batch, options, beit):
  # Drop path draws other keys under scan (the same distribution), so it is off there.
  encoder = dict(ENCODER, drop_path=0.0 if options.get('scan') else 0.2, **(BEIT if beit else {}))
  plain = vit.Classifier(5, vit.Encoder(**encoder))
  changed = vit.Classifier(5, vit.Encoder(**encoder, **options))
  params = plain.init(jax.random.key(0), batch[0])['params']
  # The same param tree and init: checkpoints load either way.
  jax.tree.map(np.testing.assert_array_equal, changed.init(jax.random.key(0), batch[0])['params'],
               params)
  params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape),
                        params)  # a non-zero head, so every block gets a gradient
  loss, grads = _loss_and_grads(plain, params, *batch)
  changed_loss, changed_grads = _loss_and_grads(changed, params, *batch)
  np.testing.assert_allclose(changed_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               changed_grads, grads)
  np.testing.assert_allclose(changed.apply({'params': params}, batch[0])[1]['features'],
                             plain.apply({'params': params}, batch[0])[1]['features'], atol=2e-6)


def test_scan_drops_paths_in_training():
  model = vit.Classifier(5, vit.Encoder(**ENCODER, drop_path=0.5, scan=True))
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
  params = model.init(jax.random.key(0), images)['params']
  features = [model.apply({'params': params}, images, train=True,
                          rngs={'dropout': jax.random.key(seed)})[1]['features'] for seed in (0, 1)]
  assert not np.allclose(features[0], features[1])
  assert not np.allclose(features[0], model.apply({'params': params}, images)[1]['features'])


def test_scan_runs_the_masked_image_model():
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  masks = masking.batch_masks(jax.random.key(0), jnp.arange(2), scheme='random', grid=(4, 4),
                              mask_ratio=0.75, min_block=4)
  plain, scanned = (mim.MaskedImageModel(vit.Encoder(**ENCODER, scan=scan), scheme='random',
                                         num_channels=1) for scan in (False, True))
  params = plain.init(jax.random.key(0), images, masks)['params']
  np.testing.assert_allclose(scanned.apply({'params': params}, images, masks),
                             plain.apply({'params': params}, images, masks), atol=1e-5)


def test_bfloat16_computes_in_bf16_but_keeps_params_features_and_logits_float32(batch):
  images, labels = batch
  full = vit.Classifier(5, vit.Encoder(**ENCODER, rel_pos_bias='block', qkv_bias='qv'))
  half = vit.Classifier(5, vit.Encoder(**ENCODER, rel_pos_bias='block', qkv_bias='qv',
                                       dtype=jnp.bfloat16))
  params = half.init(jax.random.key(0), images)['params']
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape),
                        params)  # a non-zero head, so the logits say something
  (logits, aux), (logits_32, aux_32) = (m.apply({'params': params}, images) for m in (half, full))
  assert logits.dtype == aux['features'].dtype == jnp.float32
  hlo = jax.jit(lambda p: half.apply({'params': p}, images)).lower(params).as_text()
  assert 'bf16' in hlo
  # bf16 keeps 8 bits of mantissa: agreement to a few 1e-3, not to float32 rounding.
  np.testing.assert_allclose(logits, logits_32, atol=0.05)
  np.testing.assert_allclose(aux['features'], aux_32['features'], atol=0.1)
  loss, _ = _loss_and_grads(half, params, images, labels)
  np.testing.assert_allclose(loss, _loss_and_grads(full, params, images, labels)[0], rtol=0.02)


def test_bfloat16_mim_loss_is_float32():
  model = mim.MaskedImageModel(vit.Encoder(**ENCODER, dtype=jnp.bfloat16), scheme='random',
                               num_channels=1)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  masks = masking.batch_masks(jax.random.key(0), jnp.arange(2), scheme='random', grid=(4, 4),
                              mask_ratio=0.75, min_block=4)
  params = model.init(jax.random.key(0), images, masks)['params']
  pred = model.apply({'params': params}, images, masks)
  assert pred.dtype == jnp.float32
  assert mim.mim_loss(pred, images, masks['mask'], 4).dtype == jnp.float32


def test_gradient_accumulation_equals_one_big_batch():
  """Two micro-batches of 8 make the updates of one batch of 16 (drop path off, so the loss
  has no randomness; the micro-batches are strided rows of the batch)."""
  config = digits.get_config('smoke')
  config.finetune.drop_path = 0.0
  # A step that moves every param (the stage's schedule starts at 0).
  stage = dataclasses.replace(finetune.describe(config), tx=optax.sgd(1.0))
  mesh = parallel.make_mesh((('data', -1),))
  init, _, shardings = train_loop.abstract_state(stage, parallel.Placement(mesh))
  state = jax.jit(init, out_shardings=shardings)()
  batch = {'image': jax.random.normal(jax.random.key(1), (16, 16, 16, 1)),
           'label': jnp.arange(16) % 10}
  after = {}
  for micro_batches in (1, 2):
    config.finetune.grad_accum_steps = micro_batches
    step = train_loop.make_train_step(dataclasses.replace(stage, cfg=config.finetune),
                                      shardings, mesh)
    new_state = jax.tree.map(jnp.copy, state)  # the step donates its input
    for _ in range(2):  # the head starts at zero: the encoder moves from the second step
      new_state, metrics = step(new_state, batch)
    after[micro_batches] = (new_state.params, metrics['loss'])
  np.testing.assert_allclose(after[2][1], after[1][1], rtol=1e-5)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), after[1][0], state.params)
  assert all(jax.tree.leaves(moved))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               after[2][0], after[1][0])

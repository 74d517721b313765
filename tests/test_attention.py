"""The fused attention (jax.nn.dot_product_attention) computes what the einsum attention does,
forward and gradients, for every attention variant; 'auto' picks per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits
from mood_jax.models import masking, mim, vit

ENCODER = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)
VARIANTS = {
    'vit': dict(),
    'qv_bias': dict(qkv_bias='qv'),
    'no_bias': dict(qkv_bias='none'),
    'beit_block_rel_pos': dict(posemb='none', qkv_bias='qv', layer_scale=0.1,
                               rel_pos_bias='block'),
    'shared_rel_pos': dict(posemb='none', rel_pos_bias='shared'),
}


def _perturbed(params):
  """Non-zero biases, relative position tables and head: every term of attention matters."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _assert_close(fused, einsum, rtol, atol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), fused, einsum)


@pytest.mark.parametrize('variant', VARIANTS)
def test_fused_classifier_matches_einsum_forward_and_gradients(variant):
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
  labels = jnp.arange(4) % 3
  models = {attention: vit.Classifier(3, vit.Encoder(**ENCODER, **VARIANTS[variant],
                                                     attention=attention))
            for attention in ('einsum', 'fused')}
  params = models['einsum'].init(jax.random.key(0), images)['params']
  # The same params: a checkpoint trained with one attention loads into the other.
  jax.tree.map(np.testing.assert_array_equal,
               models['fused'].init(jax.random.key(0), images)['params'], params)
  params = _perturbed(params)

  def loss(p, model):
    logits, _ = model.apply({'params': p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  out = {name: (model.apply({'params': params}, images),
                jax.value_and_grad(loss)(params, model)) for name, model in models.items()}
  (logits, aux), (value, grads) = out['einsum']
  (f_logits, f_aux), (f_value, f_grads) = out['fused']
  np.testing.assert_allclose(f_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f_aux['tokens'], aux['tokens'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f_value, value, rtol=1e-6)
  _assert_close(f_grads, grads, rtol=1e-4, atol=1e-6)
  assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(grads))  # a gradient to compare


@pytest.mark.parametrize('scheme', masking.SCHEMES)
def test_fused_masked_image_model_matches_einsum(scheme):
  """MAE's encoder sees the visible patches only (keep_ids) and its decoder the restored
  sequence; BEiT's sees mask tokens in place of the masked patches."""
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  masks = masking.batch_masks(jax.random.key(5), jnp.arange(4), scheme=scheme, grid=(4, 4),
                              mask_ratio=0.5, min_block=2)
  options = VARIANTS['vit' if scheme == 'random' else 'beit_block_rel_pos']
  models = {attention: mim.MaskedImageModel(vit.Encoder(**ENCODER, **options, attention=attention),
                                            scheme=scheme, num_channels=3, decoder_width=16,
                                            decoder_depth=1, decoder_heads=2)
            for attention in ('einsum', 'fused')}
  params = _perturbed(models['einsum'].init(jax.random.key(0), images, masks)['params'])

  def loss(p, model):
    pred = model.apply({'params': p}, images, masks)
    return mim.mim_loss(pred, images, masks['mask'], 4)

  value, grads = jax.value_and_grad(loss)(params, models['einsum'])
  f_value, f_grads = jax.value_and_grad(loss)(params, models['fused'])
  np.testing.assert_allclose(models['fused'].apply({'params': params}, images, masks),
                             models['einsum'].apply({'params': params}, images, masks),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f_value, value, rtol=1e-6)
  _assert_close(f_grads, grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('with_bias', [False, True])
def test_padding_for_cudnn_changes_nothing(with_bias):
  """cuDNN trains with a bias only on an even token count, so `fused_attention` pads to one
  and masks the padded keys out; XLA's implementation honours the same mask, so the padded
  path is checked here: 17 tokens (a 4x4 grid + CLS) padded to 24."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (2, 17, 2, 8)) for key in keys[:3])
  bias = jax.random.normal(keys[3], (2, 17, 17)) if with_bias else None

  def attend(q, k, v, bias, pad_to):
    return vit.fused_attention(q, k, v, bias, pad_to=pad_to)

  def total(pad_to):
    return lambda *args: jnp.sum(attend(*args, pad_to) ** 2)

  np.testing.assert_allclose(attend(q, k, v, bias, 8), attend(q, k, v, bias, 1),
                             rtol=1e-6, atol=1e-6)
  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  padded = jax.grad(total(8), argnums)(q, k, v, bias)
  plain = jax.grad(total(1), argnums)(q, k, v, bias)
  _assert_close(padded, plain, rtol=1e-5, atol=1e-6)


def test_bfloat16_fused_matches_einsum_within_bfloat16_rounding():
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
  beit = VARIANTS['beit_block_rel_pos']
  models = {attention: vit.Classifier(3, vit.Encoder(**ENCODER, **beit, dtype=jnp.bfloat16,
                                                     attention=attention))
            for attention in ('einsum', 'fused')}
  params = _perturbed(models['einsum'].init(jax.random.key(0), images)['params'])
  fused = models['fused'].apply({'params': params}, images)[1]['features']
  einsum = models['einsum'].apply({'params': params}, images)[1]['features']
  assert fused.dtype == einsum.dtype == jnp.float32
  np.testing.assert_allclose(fused, einsum, atol=0.1)


@pytest.mark.parametrize('backend, dtype, head_dim, expected', [
    ('gpu', jnp.bfloat16, 64, 'cudnn'), ('gpu', jnp.float16, 128, 'cudnn'),
    ('gpu', jnp.float32, 64, None),     # cuDNN's kernel takes 16-bit inputs only
    ('gpu', jnp.bfloat16, 12, None),    # nor head dims off its grid
    ('tpu', jnp.bfloat16, 64, None), ('cpu', jnp.bfloat16, 64, None)])
def test_fused_attention_uses_cudnn_where_it_runs(backend, dtype, head_dim, expected):
  assert vit.fused_implementation(backend, dtype, head_dim) == expected


@pytest.mark.parametrize('backend, dtype, attention', [
    ('cpu', 'float32', 'einsum'), ('gpu', 'bfloat16', 'fused'), ('tpu', 'bfloat16', 'fused')])
def test_auto_resolves_per_backend(backend, dtype, attention):
  model = dict(digits.get_config().model, dtype='auto', attention='auto')
  assert vit.compute_settings(model, backend) == {'dtype': dtype, 'attention': attention}
  chosen = dict(model, dtype='float32', attention='fused')
  assert vit.compute_settings(chosen, backend) == {'dtype': 'float32', 'attention': 'fused'}

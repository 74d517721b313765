"""ViT and MIM model: shapes, pooling, masking inside the encoder, the MIM loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mood_jax.errors import UserError
from mood_jax.models import masking, mim, vit

ENCODER = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)


@pytest.mark.parametrize('pool', ['mean', 'cls'])
@pytest.mark.parametrize('posemb', ['learn', 'sincos2d'])
def test_classifier_shapes(pool, posemb):
  model = vit.Classifier(7, vit.Encoder(**ENCODER, posemb=posemb), pool=pool)
  images = jnp.ones((3, 16, 16, 1))
  params = model.init(jax.random.key(0), images)['params']
  logits, aux = model.apply({'params': params}, images)
  assert logits.shape == (3, 7)
  assert aux['features'].shape == aux['pre_logits'].shape == (3, 32)
  assert aux['tokens'].shape == (3, 1 + 16, 32)
  assert ('fc_norm' in params) == (pool == 'mean') and ('norm' in params) == (pool == 'cls')


def test_mean_pool_feature_is_layernorm_of_mean_patch_token():
  model = vit.Classifier(3, vit.Encoder(**ENCODER), pool='mean')
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  params = model.init(jax.random.key(0), images)['params']
  _, aux = model.apply({'params': params}, images)
  pooled = aux['tokens'][:, 1:].mean(axis=1)
  expected = (pooled - pooled.mean(-1, keepdims=True)) / jnp.sqrt(pooled.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(aux['features'], expected, atol=1e-4)


def test_drop_path_is_active_only_in_training():
  model = vit.Classifier(3, vit.Encoder(**ENCODER, drop_path=0.5))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
  params = model.init(jax.random.key(0), images)['params']
  features = lambda **kw: model.apply({'params': params}, images, **kw)[1]['features']
  np.testing.assert_array_equal(features(), features())
  train_a = features(train=True, rngs={'dropout': jax.random.key(1)})
  train_b = features(train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(train_a, train_b, atol=1e-3)


def test_resample_posemb_keeps_cls_and_resizes_the_patch_grid():
  pos = jax.random.normal(jax.random.key(0), (1, 1 + 2 * 2, 8))
  assert vit.posemb_grid(pos) == 2 and vit.posemb_grid(pos[:, :-1]) is None
  np.testing.assert_allclose(vit.resample_posemb(pos, 2), pos, atol=1e-6)
  larger = vit.resample_posemb(pos, 3)
  assert larger.shape == (1, 1 + 3 * 3, 8)
  np.testing.assert_array_equal(larger[:, 0], pos[:, 0])
  # Each channel is resized as an image: a constant one stays constant.
  constant = pos.at[:, 1:].set(jnp.arange(8.0))
  np.testing.assert_allclose(vit.resample_posemb(constant, 5)[0, 1:],
                             np.tile(np.arange(8.0), (25, 1)), atol=1e-5)


@pytest.mark.parametrize('variant', ['Q/16', 'S', 'S/x', 'B16'])
def test_unknown_variant_lists_choices(variant):
  with pytest.raises(UserError, match='Ti/4'):
    vit.parse_variant(variant)


def test_variant_strings():
  assert vit.parse_variant('B/16') == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                           patch_size=16)
  assert vit.parse_variant('L/16')['depth'] == 24


@pytest.mark.parametrize('scheme', ['random', 'blockwise'])
def test_mim_model_predicts_every_patch(scheme):
  model = mim.MaskedImageModel(vit.Encoder(**ENCODER), scheme=scheme, num_channels=3,
                               decoder_width=16, decoder_depth=1, decoder_heads=2)
  images = jnp.ones((2, 16, 16, 3))
  masks = masking.batch_masks(jax.random.key(0), jnp.arange(2), scheme=scheme, grid=(4, 4),
                              mask_ratio=0.5, min_block=2)
  params = model.init(jax.random.key(0), images, masks)['params']
  pred = model.apply({'params': params}, images, masks)
  assert pred.shape == (2, 16, 4 * 4 * 3)
  assert ('decoder' in params) == (scheme == 'random')
  assert ('mask_token' in params['encoder']) == (scheme == 'blockwise')


def test_patchify_round_trip_order():
  images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  patches = mim.patchify(images, 4)
  assert patches.shape == (2, 4, 48)
  # Patch 1 is the top-right 4x4 block, pixels in row-major order.
  np.testing.assert_array_equal(patches[0, 1], images[0, :4, 4:].reshape(-1))


def test_mim_loss_ignores_visible_patches():
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  mask = jnp.array([[True, False, False, True], [False, True, False, False]])
  pred = jax.random.normal(jax.random.key(1), (2, 4, 16))
  corrupted = jnp.where(mask[..., None], pred, pred + 100.0)  # only visible patches change
  assert mim.mim_loss(pred, images, mask, 4) == pytest.approx(
      float(mim.mim_loss(corrupted, images, mask, 4)))
  assert mim.mim_loss(pred + 1.0, images, mask, 4) != pytest.approx(
      float(mim.mim_loss(pred, images, mask, 4)))


def test_mim_loss_targets_are_normalised_per_patch():
  images = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))
  mask = jnp.ones((1, 4), bool)
  target = mim.patchify(images, 4)
  target = (target - target.mean(-1, keepdims=True)) / jnp.sqrt(target.var(-1, keepdims=True) + 1e-6)
  assert float(mim.mim_loss(target, images, mask, 4)) == pytest.approx(0.0, abs=1e-8)
  assert float(mim.mim_loss(mim.patchify(images, 4), images, mask, 4, norm_pix=False)) == 0.0


def _block_params(**options):
  model = vit.Classifier(3, vit.Encoder(**ENCODER, **options))
  params = model.init(jax.random.key(0), jnp.ones((1, 16, 16, 1)))['params']
  return model, params


def test_beit_options_add_their_params_and_keep_the_default_names():
  _, plain = _block_params()
  _, beit = _block_params(posemb='none', qkv_bias='qv', layer_scale=0.1, rel_pos_bias='block')
  block = beit['encoder']['block0']
  assert set(plain['encoder']) - set(beit['encoder']) == {'pos_embedding'}
  assert 'bias' not in block['attn']['qkv'] and 'bias' in plain['encoder']['block0']['attn']['qkv']
  assert block['attn']['q_bias'].shape == block['attn']['v_bias'].shape == (32,)
  np.testing.assert_array_equal(block['gamma_1'], np.full(32, 0.1, np.float32))
  assert block['attn']['rel_pos_bias']['relative_position_bias_table'].shape == (7 * 7 + 3, 2)
  _, shared = _block_params(rel_pos_bias='shared')
  assert shared['encoder']['rel_pos_bias']['relative_position_bias_table'].shape == (52, 2)
  assert 'rel_pos_bias' not in shared['encoder']['block0']['attn']


def test_relative_position_bias_changes_attention_and_needs_every_patch():
  model, params = _block_params(rel_pos_bias='shared')
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  table = params['encoder']['rel_pos_bias']['relative_position_bias_table']
  biased = jax.tree.map(lambda x: x, params)
  biased['encoder']['rel_pos_bias']['relative_position_bias_table'] = table.at[0].set(5.0)
  features = lambda p: model.apply({'params': p}, images)[1]['features']
  assert not np.allclose(features(params), features(biased), atol=1e-4)
  with pytest.raises(ValueError, match='needs every patch'):
    model.encoder.apply({'params': params['encoder']}, images,
                        keep_ids=jnp.zeros((2, 4), jnp.int32))


def test_relative_position_index_pairs_offsets_and_cls():
  index = vit.relative_position_index(2)  # 3 x 3 offsets, then CLS->patch, patch->CLS, CLS
  assert index.shape == (5, 5) and index[0, 0] == 11
  assert set(index[0, 1:]) == {9} and set(index[1:, 0]) == {10}
  assert (np.diag(index)[1:] == 4).all()  # zero offset: the centre of the 3 x 3 grid
  assert index[1, 4] == 0 and index[4, 1] == 8  # (-1, -1) and (+1, +1)


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-8., 8., 1001)
  np.testing.assert_allclose(vit.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  assert vit.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16

"""Scorers of several named layers: the model hands them out, the scorers match float64
NumPy restatements of OpenOOD's mds_ensemble, gram and rankfeat postprocessors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from mood_jax import parallel
from mood_jax.ood import extraction
from mood_jax.models import vit
from mood_jax.ood import scorers

ENCODER = dict(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4)
NUM_CLASSES = 4


@pytest.fixture(scope='module')
def model_and_params():
  model = vit.Classifier(NUM_CLASSES, vit.Encoder(**ENCODER))
  images = jnp.zeros((2, 8, 8, 3))
  params = model.init(jax.random.key(0), images)['params']
  # A head that is not zero, so logits vary.
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), params['head']['kernel'].shape)
  return model, params


def _images(seed, num):
  return jax.random.normal(jax.random.key(seed), (num, 8, 8, 3))


def test_named_layers_and_the_plain_pass_unchanged(model_and_params):
  model, params = model_and_params
  images = _images(0, 4)
  logits, aux = model.apply({'params': params}, images)
  (logits_sown, aux_sown), state = model.apply({'params': params}, images,
                                               mutable=['intermediates'])
  named = vit.named_layers(aux_sown, state['intermediates'])
  assert sorted(named) == ['encoder', 'encoder/block00', 'encoder/block01', 'encoder/block02',
                           'pre_logits']
  assert named['encoder/block00'].shape == (4, 5, 16)
  np.testing.assert_array_equal(named['encoder/block02'], named['encoder'])
  np.testing.assert_array_equal(logits_sown, logits)
  np.testing.assert_array_equal(named['pre_logits'], aux['features'])
  # The scan path sows the same layers.
  scanned = vit.Classifier(NUM_CLASSES, vit.Encoder(**ENCODER, scan=True))
  (_, aux_scan), state_scan = scanned.apply({'params': params}, images,
                                            mutable=['intermediates'])
  for name, values in vit.named_layers(aux_scan, state_scan['intermediates']).items():
    np.testing.assert_allclose(values, named[name], rtol=1e-5, atol=1e-5, err_msg=name)


def _extract(scorer, model, params, images):
  mesh = parallel.make_mesh((('data', -1),))
  forward = extraction.make_forward(model, mesh, features_fn=lambda apply, x: scorer.forward(
      apply, x, **scorer.hparams))
  return jax.tree.map(np.asarray, forward(params, images))


def _numpy_mds(train, labels, query):
  """get_MDS_stat + compute_Mahalanobis_score (no noise), one layer: max_c -d^2 / 2."""
  train, query = np.float64(train), np.float64(query)
  classes = np.unique(labels)
  means = np.stack([train[labels == c].mean(0) for c in classes])
  precision = np.linalg.pinv(np.cov((train - means[np.searchsorted(classes, labels)]).T,
                                    bias=True))
  centred = query[:, None] - means[None]
  return (-0.5 * np.einsum('ncd,de,nce->nc', centred, precision, centred)).max(-1)


def test_mds_ensemble_matches_numpy(model_and_params):
  model, params = model_and_params
  scorer = scorers.get('mds_ensemble').with_hparams(layers='encoder/block01, encoder/block02')
  train_features, train_logits = _extract(scorer, model, params, _images(1, 120))
  query_features, query_logits = _extract(scorer, model, params, _images(2, 30))
  assert sorted(train_features) == ['layer00', 'layer01']
  labels = np.arange(120) % NUM_CLASSES
  stats = scorers.fit(scorer, train_features, train_logits, labels, None)
  ours = scorers.score(scorer, stats, query_features, query_logits, chunk_size=7)
  expected = sum(_numpy_mds(train_features[k], labels, query_features[k])
                 for k in ('layer00', 'layer01'))
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
  # layer00 is the mean over block01's tokens, layer01 over block02's.
  (_, aux), state = model.apply({'params': params}, _images(2, 30), mutable=['intermediates'])
  named = vit.named_layers(aux, state['intermediates'])
  np.testing.assert_allclose(query_features['layer01'], named['encoder/block02'].mean(1),
                             rtol=1e-5, atol=1e-6)
  # 'all': every block's token mean, then MOOD's pooled feature.
  features, _ = _extract(scorers.get('mds_ensemble'), model, params, _images(2, 30))
  assert sorted(features) == ['layer00', 'layer01', 'layer02', 'layer03']
  np.testing.assert_allclose(features['layer03'], aux['features'], rtol=1e-5, atol=1e-6)


def test_unknown_layer_names_the_available_ones(model_and_params):
  model, params = model_and_params
  scorer = scorers.get('mds_ensemble').with_hparams(layers='encoder/block09')
  with pytest.raises(ValueError, match=r"\['encoder/block09'\] not among .*encoder/block00"):
    _extract(scorer, model, params, _images(1, 4))


def _numpy_gram(tokens, power):
  """G_p, with the Gram matrix itself: x^p as [C, space], (x x^T).sum(dim=2), signed root."""
  raised = np.float64(tokens).transpose(0, 2, 1)**power  # [B, C, T]
  sums = (raised @ raised.transpose(0, 2, 1)).sum(2)
  return np.sign(sums) * np.abs(sums)**(1 / power)


def _numpy_delta(mins, maxs, x):
  return ((np.maximum(mins - x, 0) / np.abs(mins + 1e-6)).sum(-1)
          + (np.maximum(x - maxs, 0) / np.abs(maxs + 1e-6)).sum(-1))


def test_gram_matches_numpy(model_and_params):
  model, params = model_and_params
  powers = (1, 2, 3)
  scorer = scorers.get('gram').with_hparams(powers=powers)
  train_images, query_images = _images(3, 200), jnp.concatenate([_images(4, 20),
                                                                 3 * _images(5, 20)])
  train_features, train_logits = _extract(scorer, model, params, train_images)
  query_features, query_logits = _extract(scorer, model, params, query_images)
  # The features are G_p of each block's tokens.
  (_, aux), state = model.apply({'params': params}, query_images, mutable=['intermediates'])
  named = vit.named_layers(aux, state['intermediates'])
  for i in range(3):
    for j, p in enumerate(powers):
      expected = _numpy_gram(named[f'encoder/block{i:02d}'], p)
      # A signed sum (odd p) can cancel: float32 rounding of its terms, not of the result.
      np.testing.assert_allclose(query_features[f'layer{i:02d}'][:, j], expected, rtol=1e-4,
                                 atol=1e-5 * np.abs(expected).max())
  labels = np.arange(200) % NUM_CLASSES
  stats = scorers.fit(scorer, train_features, train_logits, labels, None)
  ours = scorers.score(scorer, stats, query_features, query_logits)
  # sample_estimator and get_deviations, with the same per-class 10% split as ours.
  rng = np.random.default_rng(0)
  splits = []
  for c in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == c)
    held = np.zeros(len(rows), bool)
    held[rng.choice(len(rows), int(0.1 * len(rows)), replace=False)] = True
    splits.append((rows[~held], rows[held]))
  predicted = query_logits.argmax(-1)
  deviation = np.zeros(len(predicted))
  for key in sorted(train_features):
    train, query = np.float64(train_features[key]), np.float64(query_features[key])
    mins = np.stack([train[fit].min(0) for fit, _ in splits])
    maxs = np.stack([train[fit].max(0) for fit, _ in splits])
    normaliser = np.concatenate([_numpy_delta(mins[c], maxs[c], train[val]).sum(-1)
                                 for c, (_, val) in enumerate(splits)]).mean()
    deviation += _numpy_delta(mins[predicted], maxs[predicted], query).sum(-1) / normaliser
  expected = -deviation / special.softmax(np.float64(query_logits), -1).max(-1)
  np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-4)
  assert ours[20:].mean() < ours[:20].mean()  # larger inputs deviate more


def test_rankfeat_matches_numpy_svd(model_and_params):
  model, params = model_and_params
  images = _images(6, 6)
  scorer = scorers.get('rankfeat')
  features, logits = _extract(scorer, model, params, images)
  assert features is None

  def numpy_edit(target):
    def edit(index, tokens):
      if index != target:
        return tokens
      x = np.float64(tokens)
      u, s, vt = np.linalg.svd(x, full_matrices=False)
      return jnp.asarray(x - s[:, :1, None] * u[:, :, :1] * vt[:, :1, :], jnp.float32)
    return edit

  # Eager (unjitted) passes, so the edit runs in NumPy.
  expected_logits = np.mean([np.float64(model.apply({'params': params}, images,
                                                    edit=numpy_edit(t))[0]) for t in (2, 1)],
                            axis=0)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scorers.score(scorer, {}, None, logits),
                             special.logsumexp(expected_logits, -1), rtol=1e-4)

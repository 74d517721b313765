"""Scorers match their formulas and MOOD's NumPy Mahalanobis; the registry is extensible."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from mood_jax.ood import scorers


def _numpy_mahalanobis_mood(train, query):
  """MOOD's reference: L2-normalise, biased covariance, pinv, negative squared distance."""
  def normalize(x):
    x = np.float64(x)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  train, query = normalize(train), normalize(query)
  precision = np.linalg.pinv(np.cov(train, rowvar=False, bias=True))
  centered = query - train.mean(0)
  return -np.einsum('nd,de,ne->n', centered, precision, centered)


def _features(seed, num_rows, dim):
  rng = np.random.default_rng(seed)
  # An offset shared by all rows, as in real features, so the mean matters.
  return (rng.normal(size=(num_rows, dim)) + rng.uniform(0, 2, dim)).astype(np.float32)


def _mahalanobis_scores(train, query, **fit_kwargs):
  scorer = scorers.get('mahalanobis_mood')
  fit = scorers.fit_mahalanobis_mood if fit_kwargs else scorer.fit
  stats = fit(train, None, None, None, **fit_kwargs)
  return np.asarray(scorer.score(stats, query, None))


@pytest.mark.parametrize('num_rows,dim', [(600, 16), (300, 48)])
def test_mahalanobis_mood_matches_numpy(num_rows, dim):
  train, query = _features(0, num_rows, dim), _features(1, 40, dim)
  expected = _numpy_mahalanobis_mood(train, query)
  np.testing.assert_allclose(_mahalanobis_scores(train, query), expected, rtol=1e-4)


def test_mahalanobis_mood_on_rank_deficient_bank():
  train, query = _features(0, 12, 64), _features(1, 30, 64)  # N < D: singular covariance
  scores = _mahalanobis_scores(train, query)
  assert np.isfinite(scores).all()
  np.testing.assert_allclose(scores, _numpy_mahalanobis_mood(train, query), rtol=1e-4)


def test_mahalanobis_mood_is_chunk_size_independent():
  train, query = _features(0, 250, 24), _features(1, 20, 24)
  by_chunk = [_mahalanobis_scores(train, query, chunk_size=size) for size in (7, 64, 250, 1000)]
  for scores in by_chunk[1:]:
    np.testing.assert_allclose(scores, by_chunk[0], rtol=1e-5)


def test_mahalanobis_mood_ranks_train_like_features_higher():
  train = _features(0, 500, 16)
  scores = _mahalanobis_scores(train, np.concatenate([train[:50], -train[:50]]))
  assert scores[:50].min() > scores[50:].max()


def test_logit_scorers_follow_their_formulas():
  logits = np.random.default_rng(0).normal(size=(32, 10)).astype(np.float32) * 3
  expected = {
      'msp': special.softmax(logits, axis=-1).max(-1),
      'maxlogit': logits.max(-1),
      'energy': special.logsumexp(logits, axis=-1),
  }
  for name, values in expected.items():
    scorer = scorers.get(name)
    assert scorer.needs_logits
    stats = scorer.fit(None, logits, None, None)
    np.testing.assert_allclose(scorer.score(stats, None, logits), values, rtol=1e-5,
                               err_msg=name)


def test_feature_scorer_needs_no_logits():
  assert not scorers.get('mahalanobis_mood').needs_logits


def test_unknown_name_error_lists_registered_scorers():
  with pytest.raises(KeyError) as error:
    scorers.get('nope')
  for name in ('msp', 'maxlogit', 'energy', 'mahalanobis_mood'):
    assert name in str(error.value)


def test_user_registered_scorer_is_usable_by_name(monkeypatch):
  monkeypatch.setattr(scorers, '_REGISTRY', dict(scorers._REGISTRY))  # keep others unaffected
  scorer = scorers.Scorer(
      name='test_feature_norm',
      fit=lambda features, logits, labels, head: {'scale': jnp.float32(2.)},
      score=lambda stats, features, logits: stats['scale'] * jnp.linalg.norm(features, axis=-1),
      needs_logits=False)
  scorers.register(scorer)
  assert 'test_feature_norm' in scorers.names()
  found = scorers.get('test_feature_norm')
  features = np.array([[3., 4.], [0., 1.]], np.float32)
  stats = found.fit(features, None, None, None)
  np.testing.assert_allclose(found.score(stats, features, None), [10., 2.])
  with pytest.raises(ValueError, match='already registered'):
    scorers.register(scorer)

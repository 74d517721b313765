"""Scorers match plain NumPy references of their formulas; chunks and meshes change nothing.

The mesh case runs this file as a script in a subprocess with 8 fake CPU devices (the
pytest process has one); the script saves its scores for the test to compare.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats as scipy_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # as a script, for mood_jax

from mood_jax import parallel  # noqa: E402
from mood_jax.ood import metrics, scorers  # noqa: E402

DIM, NUM_CLASSES = 24, 6


def _features(seed, num_rows, dim=DIM):
  rng = np.random.default_rng(seed)
  # An offset shared by all rows, as in real features, so the mean matters.
  return (rng.normal(size=(num_rows, dim)) + rng.uniform(0, 2, dim)).astype(np.float32)


def _head(seed, dim=DIM, num_classes=NUM_CLASSES):
  rng = np.random.default_rng(seed)
  return {'kernel': rng.normal(0, 0.5, (dim, num_classes)).astype(np.float32),
          'bias': rng.normal(0, 0.5, num_classes).astype(np.float32)}


def _split(seed, num_rows, head, dim=DIM):
  """Features, their logits and labels (the head's predictions), as the evaluate stage."""
  features = _features(seed, num_rows, dim)
  logits = features @ head['kernel'] + head['bias']
  return {'features': features, 'logits': logits, 'label': logits.argmax(-1)}


def _fit_score(name, train, query, head=None, **hparams):
  scorer = scorers.get(name).with_hparams(**hparams)
  stats = scorers.fit(scorer, train['features'], train['logits'], train['label'], head)
  return scorers.score(scorer, stats, query['features'], query['logits'])


@pytest.fixture(scope='module')
def data():
  head = _head(0)
  return {'head': head, 'train': _split(1, 400, head), 'query': _split(2, 60, head)}


# --- NumPy references ----------------------------------------------------------------------


def _normalize(x):
  x = np.float64(x)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_mahalanobis_mood(train, query):
  """MOOD's reference: L2-normalise, biased covariance, pinv, negative squared distance."""
  train, query = _normalize(train), _normalize(query)
  precision = np.linalg.pinv(np.cov(train, rowvar=False, bias=True))
  centered = query - train.mean(0)
  return -np.einsum('nd,de,ne->n', centered, precision, centered)


def _numpy_class_distances(train, labels, query):
  """[N, classes] squared distances to class means under the tied covariance, float64."""
  train, query = np.float64(train), np.float64(query)
  classes = np.unique(labels)
  means = np.stack([train[labels == c].mean(0) for c in classes])
  within = train - means[np.searchsorted(classes, labels)]
  precision = np.linalg.pinv(within.T @ within / len(train))
  centered = query[:, None] - means[None]
  return np.einsum('ncd,de,nce->nc', centered, precision, centered)


def _numpy_rmds(train, labels, query):
  train64 = np.float64(train)
  centered = np.float64(query) - train64.mean(0)
  background = np.einsum('nd,de,ne->n', centered,
                         np.linalg.pinv(np.cov(train64, rowvar=False, bias=True)), centered)
  return background - _numpy_class_distances(train, labels, query).min(-1)


def _numpy_knn(train, query, k):
  distances = ((_normalize(query)[:, None] - _normalize(train)[None])**2).sum(-1)
  return -np.sort(distances, axis=-1)[:, k - 1]


def _numpy_null_space(train, head, dim):
  kernel, bias = np.float64(head['kernel']), np.float64(head['bias'])
  origin = -np.linalg.pinv(kernel.T) @ bias
  centered = np.float64(train) - origin
  eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / len(train))
  null_space = eigenvectors[:, np.argsort(-eigenvalues)[dim:]]
  return lambda x: np.linalg.norm((np.float64(x) - origin) @ null_space, axis=-1)


def _numpy_vim(train, query, head, dim):
  residual = _numpy_null_space(train['features'], head, dim)
  alpha = train['logits'].max(-1).mean() / residual(train['features']).mean()
  return special.logsumexp(np.float64(query['logits']), -1) - alpha * residual(query['features'])


def _numpy_ash(features, variant, percentile):
  features = np.float64(features)
  num_kept = features.shape[1] - int(np.round(features.shape[1] * percentile / 100))
  order = np.argsort(-features, axis=-1)[:, :num_kept]
  kept = np.take_along_axis(features, order, -1)
  if variant == 'b':
    kept = np.broadcast_to(features.sum(-1, keepdims=True) / num_kept, kept.shape)
  elif variant == 's':
    kept = kept * np.exp(features.sum(-1, keepdims=True) / kept.sum(-1, keepdims=True))
  shaped = np.zeros_like(features)
  np.put_along_axis(shaped, order, kept, -1)
  return shaped


def _numpy_energy_of_head(features, head):
  return special.logsumexp(np.float64(features) @ head['kernel'] + head['bias'], axis=-1)


def _numpy_klm(train_logits, query_logits):
  """OpenOOD's kl_matching_postprocessor.py: a class nothing is predicted as gets a one-hot
  template."""
  train_probs = special.softmax(np.float64(train_logits), -1)
  predicted = train_probs.argmax(-1)
  classes = np.eye(train_probs.shape[1])
  templates = [train_probs[predicted == c].mean(0) if np.any(predicted == c) else classes[c]
               for c in range(len(classes))]
  probs = special.softmax(np.float64(query_logits), -1)
  return -np.array([min(scipy_stats.entropy(p, t) for t in templates) for p in probs])


def _numpy_gen(logits, gamma, top_m):
  probs = np.sort(special.softmax(np.float64(logits), -1), -1)[:, -top_m:]
  return -np.sum(probs**gamma * (1 - probs)**gamma, -1)


def _jax_grad_gradnorm(features, head):
  """Per sample: L1 norm of the kernel's gradient of the mean -log softmax over classes."""
  def loss(kernel, feature):
    return -jnp.mean(jax.nn.log_softmax(feature @ kernel + head['bias']))
  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(jnp.asarray(head['kernel']), features)
  return np.abs(np.asarray(grads)).sum((1, 2))


# --- Each scorer against its reference ------------------------------------------------------


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


def test_mahalanobis_mood_on_layer_normed_features_matches_float64():
  """LayerNorm centres each row, so the bank has one direction of rounding-level variance
  (~1e-12 of the largest). float64 keeps it, as MOOD's and OpenOOD's pinv do; scoring it in
  float32 as d^T P d drowned every distance in rounding error (digits: AUROC 98.5 -> 60.4)."""
  rng = np.random.default_rng(0)
  scales = np.geomspace(1., 0.05, 32)
  def layer_normed(rows, shift=0.):
    x = rng.normal(size=(rows, 32)) * scales + shift
    # Centred up to the rounding of LayerNorm's float32 arithmetic (~1e-6 of a row).
    return np.float32(x - x.mean(-1, keepdims=True) + rng.normal(0, 1e-6, (rows, 1)))
  train, test, ood = layer_normed(800), layer_normed(200), layer_normed(200, shift=0.15)
  scores = [_mahalanobis_scores(train, query) for query in (test, ood)]
  expected = [_numpy_mahalanobis_mood(train, query) for query in (test, ood)]
  np.testing.assert_allclose(np.concatenate(scores), np.concatenate(expected), rtol=1e-2,
                             atol=1e-2 * np.abs(np.concatenate(expected)).mean())
  assert abs(metrics.ood_metrics(*scores)['auroc'] - metrics.ood_metrics(*expected)['auroc']) < 1e-3


def test_mahalanobis_mood_inverts_at_numpy_pinvs_cutoff():
  """MOOD inverts with np.linalg.pinv (rcond 1e-15), not pinvh's D x eps (2.3e-13 at D=1024):
  a direction with 1e-14 of the largest variance counts, and an OOD set shifted along it
  by 10 of its standard deviations is told apart (it was not, at pinvh's cutoff)."""
  rng = np.random.default_rng(0)
  dim = 1024
  def rows(count):
    x = rng.normal(size=(count, dim)) / np.sqrt(dim)
    x[:, 0] = 0.
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  train = rows(1300)
  largest = np.linalg.eigvalsh(np.cov(train, rowvar=False, bias=True)).max()
  def with_tiny_direction(x, shift=0.):
    x[:, 0] = np.sqrt(1e-14 * largest) * (rng.normal(size=len(x)) + shift)
    return np.float32(x)
  train = with_tiny_direction(train)
  test, ood = with_tiny_direction(rows(200)), with_tiny_direction(rows(200), shift=10.)
  for query in (test, ood):
    np.testing.assert_allclose(_mahalanobis_scores(train, query),
                               _numpy_mahalanobis_mood(train, query), rtol=1e-5)


def test_mahalanobis_mood_is_chunk_size_independent():
  train, query = _features(0, 250, 24), _features(1, 20, 24)
  by_chunk = [_mahalanobis_scores(train, query, chunk_size=size) for size in (7, 64, 250, 1000)]
  for scores in by_chunk[1:]:
    np.testing.assert_allclose(scores, by_chunk[0], rtol=1e-5)


def test_moments_continue_a_fit_with_more_rows(data):
  """Moments of a bank added in parts (chunks of any size, a class only in the second
  part) equal NumPy's float64 statistics of the whole: the fit goes on as data arrives."""
  train = data['train']
  features, labels = train['features'], train['label'].copy()
  labels[labels == 5] = 4
  labels[300:][::7] = 5  # class 5 appears only in the second part
  parts = scorers.Moments.of(features[:300], labels[:300], chunk_size=64).add(
      features[300:], labels[300:], chunk_size=17)
  whole = scorers.Moments.of(features, labels)
  x = np.float64(features)
  means = np.stack([x[labels == c].mean(0) for c in range(NUM_CLASSES)])
  within = x - means[labels]
  for moments in (parts, whole):
    np.testing.assert_array_equal(moments.counts, np.bincount(labels))
    np.testing.assert_allclose(moments.means, means, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.scatter, within.T @ within, rtol=1e-11, atol=1e-10)
    np.testing.assert_allclose(moments.pooled().scatter / len(x), np.cov(x.T, bias=True),
                               rtol=1e-11, atol=1e-12)
  query = data['query']['features']
  stats = scorers.gaussian_stats(parts)
  np.testing.assert_allclose(scorers.score(scorers.get('mahalanobis'), stats, query, None),
                             -_numpy_class_distances(features, labels, query).min(-1),
                             rtol=1e-4)


def test_mahalanobis_mood_ranks_train_like_features_higher():
  train = _features(0, 500, 16)
  scores = _mahalanobis_scores(train, np.concatenate([train[:50], -train[:50]]))
  assert scores[:50].min() > scores[50:].max()


def test_mahalanobis_matches_numpy(data):
  train, query = data['train'], data['query']
  expected = -_numpy_class_distances(train['features'], train['label'], query['features']).min(-1)
  np.testing.assert_allclose(_fit_score('mahalanobis', train, query), expected, rtol=1e-4)


def test_rmds_matches_numpy(data):
  train, query = data['train'], data['query']
  expected = _numpy_rmds(train['features'], train['label'], query['features'])
  np.testing.assert_allclose(_fit_score('rmds', train, query), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('k', [1, 7, 50])
def test_knn_matches_brute_force(data, k):
  train, query = data['train'], data['query']
  np.testing.assert_allclose(_fit_score('knn', train, query, k=k),
                             _numpy_knn(train['features'], query['features'], k), atol=1e-5)


def test_knn_with_duplicate_rows():
  train = np.repeat(_features(0, 20), 3, axis=0)
  query = np.concatenate([train[:5], _features(1, 5)])
  split = lambda x: {'features': x, 'logits': None, 'label': None}  # noqa: E731
  for k in (3, 50, 60):
    np.testing.assert_allclose(_fit_score('knn', split(train), split(query), k=k),
                               _numpy_knn(train, query, k), atol=1e-5)


def test_knn_needs_k_rows():
  with pytest.raises(ValueError, match='k=50'):
    scorers.fit(scorers.get('knn'), _features(0, 10), None, None, None)


def test_knn_is_query_chunk_size_independent(data):
  scorer = scorers.get('knn').with_hparams(k=10)
  stats = scorers.fit(scorer, data['train']['features'], None, None, None)
  queries = data['query']['features']
  whole = scorers.score(scorer, stats, queries, None, chunk_size=len(queries))
  for chunk_size in (1, 7, 32, 1000):
    # To float32 rounding: the matmul's blocking, so its sums' order, follows the row count.
    np.testing.assert_allclose(
        scorers.score(scorer, stats, queries, None, chunk_size=chunk_size), whole,
        rtol=1e-6, atol=1e-6)


def test_vim_and_residual_match_numpy(data):
  train, query, head = data['train'], data['query'], data['head']
  dim = scorers.principal_dim(DIM)
  np.testing.assert_allclose(_fit_score('vim', train, query, head),
                             _numpy_vim(train, query, head, dim), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_fit_score('residual', train, query, head),
                             -_numpy_null_space(train['features'], head, dim)(query['features']),
                             rtol=1e-4, atol=1e-4)


def test_principal_dim_rule():
  assert [scorers.principal_dim(d) for d in (64, 767, 768, 1024, 2048)] == [32, 383, 512, 512,
                                                                             1000]
  with pytest.raises(ValueError, match='0 < dim < 24'):
    _fit_score('residual', _split(0, 50, _head(0)), _split(1, 5, _head(0)), _head(0), dim=24)


def test_react_matches_numpy(data):
  train, query, head = data['train'], data['query'], data['head']
  for percentile in (50, 90):
    clipped = np.minimum(query['features'], np.percentile(train['features'], percentile))
    np.testing.assert_allclose(_fit_score('react', train, query, head, percentile=percentile),
                               _numpy_energy_of_head(clipped, head), rtol=1e-5)


@pytest.mark.parametrize('variant', ['p', 'b', 's'])
def test_ash_matches_numpy(data, variant):
  query, head = data['query'], data['head']
  # ASH assumes non-negative (post-ReLU) features: shift so that sums stay away from zero.
  query = {**query, 'features': query['features'] + 2.}
  for percentile in (65, 90):
    expected = _numpy_energy_of_head(_numpy_ash(query['features'], variant, percentile), head)
    np.testing.assert_allclose(
        _fit_score(f'ash_{variant}', data['train'], query, head, percentile=percentile),
        expected, rtol=1e-4)


def test_ash_rejects_unknown_variant(data):
  with pytest.raises(ValueError, match='ash variant'):
    _fit_score('ash_p', data['train'], data['query'], data['head'], variant='x')


def test_klm_matches_numpy(data):
  train, query = data['train'], data['query']
  np.testing.assert_allclose(_fit_score('klm', train, query),
                             _numpy_klm(train['logits'], query['logits']), atol=1e-5)
  # A class no training sample is predicted as: OpenOOD's one-hot template never wins.
  train = {**train, 'logits': train['logits'] - 50. * (np.arange(NUM_CLASSES) == 2)}
  scores = _fit_score('klm', train, query)
  assert np.isfinite(scores).all()
  np.testing.assert_allclose(scores, _numpy_klm(train['logits'], query['logits']), atol=1e-5)


def test_gen_matches_numpy(data):
  logits = data['query']['logits'] * 3
  query = {'features': None, 'logits': logits}
  for gamma, top_m in ((0.1, 100), (0.5, 3)):
    np.testing.assert_allclose(_fit_score('gen', data['train'], query, gamma=gamma, top_m=top_m),
                               _numpy_gen(logits, gamma, top_m), rtol=1e-5)


def test_gradnorm_matches_jax_grad(data):
  query = data['query']
  np.testing.assert_allclose(_fit_score('gradnorm', data['train'], query),
                             _jax_grad_gradnorm(query['features'], data['head']), rtol=1e-5)


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


def test_odin_score_is_tempered_msp():
  logits = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32) * 30
  scorer = scorers.get('odin')
  np.testing.assert_allclose(scorers.score(scorer, {}, None, logits),
                             special.softmax(np.float64(logits) / 1000, -1).max(-1), rtol=1e-6)


def test_odin_perturb_matches_hand_written_gradient():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 4, 4, 3)).astype(np.float32)
  weights = rng.normal(size=(48, 5)).astype(np.float32)
  pixel_std = np.array([0.2, 0.25, 0.3], np.float32)
  temperature, epsilon = 2., 0.01
  logits_fn = lambda x: x.reshape(len(x), -1) @ weights  # noqa: E731
  perturbed = scorers.odin_perturb(logits_fn, jnp.asarray(images), pixel_std,
                                   temperature=temperature, epsilon=epsilon)
  # d CE(z / T, y) / dz = (softmax(z / T) - onehot(y)) / T, then through the linear map.
  logits = np.float64(images.reshape(8, -1)) @ weights
  grad_logits = (special.softmax(logits / temperature, -1) - np.eye(5)[logits.argmax(-1)])
  grad_images = (grad_logits / temperature @ weights.T).reshape(images.shape)
  expected = images - epsilon / pixel_std * np.where(grad_images >= 0, 1, -1)
  np.testing.assert_allclose(perturbed, expected, rtol=1e-6)
  # The step raises the (tempered) max softmax, ODIN's point.
  before = special.softmax(logits / temperature, -1).max(-1)
  after = special.softmax(np.float64(perturbed).reshape(8, -1) @ weights / temperature, -1)
  assert (after.max(-1) > before).all()


def test_odin_perturb_matches_jax_grad_through_an_mlp():
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(6, 2, 2, 3)), jnp.float32)
  w1, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((12, 16), (16, 4)))
  logits_fn = lambda x: jax.nn.relu(x.reshape(len(x), -1) @ w1) @ w2  # noqa: E731
  perturbed = jax.jit(lambda x: scorers.odin_perturb(logits_fn, x, 0.5, temperature=1000.,
                                                     epsilon=0.0014))(images)
  def loss(x):  # the per-image CE, against the unperturbed prediction
    labels = jnp.argmax(logits_fn(images), -1)
    log_probs = jax.nn.log_softmax(logits_fn(x) / 1000., -1)
    return -jnp.sum(log_probs[jnp.arange(6), labels])
  expected = images - 0.0014 / 0.5 * jnp.where(jax.grad(loss)(images) >= 0, 1., -1.)
  np.testing.assert_allclose(perturbed, expected, rtol=1e-6)
  assert scorers.get('odin').perturb is scorers.odin_perturb


# --- OpenOOD's later postprocessors, restated in float64 NumPy --------------------------------
# Each restatement follows the reference file named beside it, line by line, in NumPy.


def _numpy_energy(logits):
  return special.logsumexp(np.float64(logits), axis=-1)


def _numpy_scale(features, head, percentile):
  """networks/scale_net.py `scale`, then the head and energy (scale_postprocessor.py)."""
  x = np.float64(features)
  kept = x.shape[1] - int(np.round(x.shape[1] * percentile / 100.))
  top = -np.sort(-x, axis=-1)[:, :kept]
  return _numpy_energy((x * np.exp(x.sum(-1) / top.sum(-1))[:, None]) @ head['kernel']
                       + head['bias'])


def test_scale_matches_numpy(data):
  query, head = data['query'], data['head']
  query = {**query, 'features': query['features'] + 2.}  # post-ReLU-like: positive sums
  for percentile in (65, 85):
    np.testing.assert_allclose(
        _fit_score('scale', data['train'], query, head, percentile=percentile),
        _numpy_scale(query['features'], head, percentile), rtol=1e-4)


def test_dice_matches_numpy(data):
  """dice_postprocessor.py: contrib = mean_act x W, mask > its p-th percentile."""
  train, query, head = data['train'], data['query'], data['head']
  weight = np.float64(head['kernel']).T  # torch's [C, D]
  for p in (50, 90):
    contribution = np.float64(train['features']).mean(0)[None] * weight
    masked = weight * (contribution > np.percentile(contribution, p))
    expected = _numpy_energy(np.float64(query['features']) @ masked.T + head['bias'])
    np.testing.assert_allclose(_fit_score('dice', train, query, head, p=p), expected,
                               rtol=1e-4)


def test_she_matches_numpy(data):
  """she_postprocessor.py: class means of the correctly predicted ID-train features, the
  query compared with its predicted class's mean."""
  train, query, head = data['train'], data['query'], data['head']
  # Labels that are not all the predictions, so that "correct" selects.
  labels = train['label'].copy()
  labels[::3] = (labels[::3] + 1) % NUM_CLASSES
  train = {**train, 'label': labels}
  correct = labels == train['logits'].argmax(-1)
  labels[correct & (labels == 0)] = 1  # class 0: none right, a zero pattern (OpenOOD: NaN)
  correct = labels == train['logits'].argmax(-1)
  patterns = np.stack([np.float64(train['features'])[correct & (labels == c)].mean(0)
                       if c else np.zeros(DIM) for c in range(NUM_CLASSES)])
  assert (query['logits'].argmax(-1) == 0).any()
  x = np.float64(query['features'])
  target = patterns[query['logits'].argmax(-1)]
  expected = {'inner_product': (x * target).sum(-1),
              'euclidean': -np.sqrt(((x - target)**2).sum(-1)),
              # torch.cosine_similarity floors each norm at 1e-8
              'cosine': (x * target).sum(-1) / np.linalg.norm(x, axis=-1)
                        / np.maximum(np.linalg.norm(target, axis=-1), 1e-8)}
  for metric, values in expected.items():
    np.testing.assert_allclose(_fit_score('she', train, query, head, metric=metric), values,
                               rtol=1e-4, err_msg=metric)
  with pytest.raises(ValueError, match='she metric'):
    _fit_score('she', train, query, head, metric='l1')


def _numpy_fdbd(train, query, head, distance_as_normalizer):
  """fdbd_postprocessor.py: the denominator matrix, then the normalised logit gaps."""
  w, b = np.float64(head['kernel']).T, np.float64(head['bias'])
  denominator = np.stack([np.linalg.norm(w - w[p], axis=1) for p in range(len(b))])
  np.fill_diagonal(denominator, 1.)
  x = np.float64(query['features'])
  output = x @ w.T + b
  gaps = np.abs(output - output.max(1, keepdims=True)) / denominator[output.argmax(1)]
  centre = np.float64(train['features']).mean(0) if distance_as_normalizer else 0.
  return gaps.sum(1) / np.linalg.norm(x - centre, axis=1)


@pytest.mark.parametrize('distance_as_normalizer', [True, False])
def test_fdbd_matches_numpy(data, distance_as_normalizer):
  train, query, head = data['train'], data['query'], data['head']
  np.testing.assert_allclose(
      _fit_score('fdbd', train, query, head, distance_as_normalizer=distance_as_normalizer),
      _numpy_fdbd(train, query, head, distance_as_normalizer), rtol=1e-4)


def test_nci_matches_numpy(data):
  """nci_postprocessor.py: w_pred . (f - mean) / ||f - mean|| + alpha ||f||_1."""
  train, query, head = data['train'], data['query'], data['head']
  x = np.float64(query['features'])
  centred = x - np.float64(train['features']).mean(0)
  alignment = (np.float64(head['kernel']).T[query['logits'].argmax(1)] * centred).sum(1)
  for alpha in (1e-4, 0.1):
    expected = alignment / np.linalg.norm(centred, axis=1) + alpha * np.abs(x).sum(1)
    np.testing.assert_allclose(_fit_score('nci', train, query, head, alpha=alpha), expected,
                               rtol=1e-4)


def test_entropy_matches_pytorch_ood():
  """pytorch-ood detector/entropy.py: p clipped to [1e-7, 1], -sum p log p (higher = OOD);
  ours is its negative. Large logits make some p fall below the clip."""
  logits = np.random.default_rng(0).normal(size=(40, 10)).astype(np.float32) * 8
  p = np.clip(special.softmax(np.float64(logits), -1), 1e-7, 1)
  np.testing.assert_allclose(scorers.score(scorers.get('entropy'), {}, None, logits),
                             (p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-6)


def test_temperature_scaling_minimises_the_nll(data):
  """temp_scaling_postprocessor.py: T minimising CE(logits / T, labels), then max softmax.
  Overconfident logits with noisy labels: the fitted T is well above 1."""
  rng = np.random.default_rng(0)
  logits = np.float32(data['train']['logits'] * 4)
  labels = np.where(rng.random(len(logits)) < 0.3, rng.integers(0, NUM_CLASSES, len(logits)),
                    logits.argmax(-1))
  train = {**data['train'], 'logits': logits, 'label': labels}
  scorer = scorers.get('temp_scaling')
  stats = scorers.fit(scorer, None, logits, labels, data['head'])

  def nll(t):
    return np.mean(special.logsumexp(np.float64(logits) / t, -1)
                   - np.float64(logits)[np.arange(len(labels)), labels] / t)
  grid = np.geomspace(0.5, 20, 20001)
  best = grid[np.argmin([nll(t) for t in grid])]
  assert float(stats['temperature']) == pytest.approx(best, rel=1e-3) and best > 1.5
  query = data['query']
  np.testing.assert_allclose(
      _fit_score('temp_scaling', train, query, data['head']),
      special.softmax(np.float64(query['logits']) / best, -1).max(-1), rtol=1e-3)
  assert scorer.fits_on_id_validation  # the evaluate stage fits it on ID validation


def test_gmm_matches_sklearn(data):
  """gmm_postprocessor.py: PCA axes, sklearn's tied GaussianMixture(random_state=0), then
  log sum_k w_k exp(-d_k^2 / 2) (the reference's log(sum + 1e-45), without the floor)."""
  from sklearn import mixture
  train, query = data['train'], data['query']
  x = np.float64(train['features'])
  eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
  axes = eigenvectors[:, np.argsort(-eigenvalues)[:8]]
  gmm = mixture.GaussianMixture(n_components=5, covariance_type='tied', random_state=0).fit(
      x @ axes)
  centred = (np.float64(query['features']) @ axes)[:, None] - gmm.means_[None]
  distances = np.einsum('nkd,de,nke->nk', centred, gmm.precisions_, centred)
  expected = special.logsumexp(np.log(gmm.weights_) - 0.5 * distances, axis=-1)
  np.testing.assert_allclose(_fit_score('gmm', train, query, num_clusters=5, dim=8), expected,
                             rtol=1e-3, atol=1e-3)
  with pytest.raises(ValueError, match='gmm dim 30'):
    _fit_score('gmm', train, query, dim=30)


def _numpy_nnguide(train, query, k, rows):
  """nnguide_postprocessor.py: bank = normalised features x energy; the query's energy
  times its mean top-k inner product (faiss IndexFlatIP) with the bank."""
  bank = _normalize(train['features'])[rows] * _numpy_energy(train['logits'])[rows, None]
  similarities = _normalize(query['features']) @ bank.T
  top = -np.sort(-similarities, axis=-1)[:, :k]
  return top.mean(-1) * _numpy_energy(query['logits'])


def test_nnguide_matches_numpy(data):
  train, query, head = data['train'], data['query'], data['head']
  for k, alpha in ((5, 1.0), (20, 0.25), (50, 0.01)):
    size = max(k, int(np.ceil(alpha * 400)))  # at least k rows
    rows = np.sort(np.random.default_rng(0).choice(400, size, replace=False))
    np.testing.assert_allclose(_fit_score('nnguide', train, query, head, k=k, alpha=alpha),
                               _numpy_nnguide(train, query, k, rows), rtol=1e-4, atol=1e-5)


def _numpy_relation(train, query, power, threshold=0.03):
  """relation_postprocessor.py: kernel = max(cos, 0) x (p . p_t), edges > 0.03, summed."""
  def norm(x):
    x = np.float64(x)
    return x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-10)
  relation = (np.maximum(norm(query['features']) @ norm(train['features']).T, 0.)
              * (special.softmax(np.float64(query['logits']), -1)
                 @ special.softmax(np.float64(train['logits']), -1).T))
  relation = relation * (np.abs(relation) > threshold)
  return (np.sign(relation) * np.abs(relation)**power).sum(-1)


def test_relation_matches_numpy(data):
  train, query, head = data['train'], data['query'], data['head']
  for power in (1, 4):
    np.testing.assert_allclose(_fit_score('relation', train, query, head, pow=power),
                               _numpy_relation(train, query, power), rtol=1e-4, atol=1e-4)


def test_bank_scorers_over_many_blocks(data, monkeypatch):
  """Banks of several blocks (the ImageNet-size path) give the one-block answer."""
  train, query, head = data['train'], data['query'], data['head']
  expected = {name: _fit_score(name, train, query, head) for name in ('knn', 'relation')}
  expected['nnguide'] = _fit_score('nnguide', train, query, head, k=50, alpha=1.)
  monkeypatch.setattr(scorers.bank, 'BANK_BLOCK', 64)  # 400 rows: 7 blocks, the last padded
  scorer = scorers.get('knn')
  stats = scorers.fit(scorer, train['features'], None, None, None)
  assert stats['bank'].shape == (448, DIM)
  for name, values in expected.items():
    hparams = {'k': 50, 'alpha': 1.} if name == 'nnguide' else {}
    # New hparams re-trace: jit caches on the static ones, and BANK_BLOCK is read at trace.
    scorer = dataclasses.replace(scorers.get(name).with_hparams(**hparams),
                                 score=jax.jit(scorers.get(name).score.__wrapped__,
                                               static_argnames=tuple(scorers.get(name).hparams)))
    stats = scorers.fit(scorer, train['features'], train['logits'], train['label'], head)
    np.testing.assert_allclose(scorers.score(scorer, stats, query['features'], query['logits']),
                               values, rtol=1e-5, atol=1e-5, err_msg=name)


# --- Properties shared by every scorer -----------------------------------------------------


def _atol(name):
  # rmds and vim are differences of larger terms (two distances of about DIM; energy and
  # the scaled residual): the terms' float32 rounding sets the error, not the result's size.
  return 1e-4 if name in ('rmds', 'vim') else 1e-5


def test_every_scorer_is_chunk_size_independent(data):
  train, query, head = data['train'], data['query'], data['head']
  for scorer in scorers.resolve('all'):
    if scorer.forward is not None:  # layer scorers: tests/test_layer_scorers.py
      continue
    stats = scorers.fit(scorer, train['features'], train['logits'], train['label'], head)
    whole, chunked = (scorers.score(scorer, stats, query['features'], query['logits'],
                                    chunk_size=size) for size in (len(query['features']), 7))
    assert whole.shape == (60,) and whole.dtype == np.float32, scorer.name
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=_atol(scorer.name),
                               err_msg=scorer.name)


def test_rank_deficient_banks_give_finite_scores():
  head = _head(0, dim=64)
  train, query = _split(0, 30, head, dim=64), _split(1, 20, head, dim=64)  # N < D
  for name in ('mahalanobis', 'rmds', 'vim', 'residual', 'mahalanobis_mood'):
    assert np.isfinite(_fit_score(name, train, query, head)).all(), name
  # A constant direction (zero variance) in a bank of more rows than dims, too.
  train = _split(2, 200, head, dim=64)
  train['features'][:, 0] = 1.
  for name in ('mahalanobis', 'rmds', 'vim', 'residual', 'mahalanobis_mood'):
    assert np.isfinite(_fit_score(name, train, query, head)).all(), name


def test_low_variance_id_direction_is_kept_as_openood_keeps_it():
  """One ID direction (rotated off the axes) with 7.8e-9 of the largest variance, and an OOD
  set shifted only along it: OpenOOD's float64 MDS (sklearn's pinvh) separates them fully;
  a float32 covariance with a 1e-6 cutoff dropped the direction (AUROC 0.509)."""
  from sklearn import covariance as sk_covariance
  from mood_jax.ood import metrics
  rng = np.random.default_rng(0)
  dim, std_small = 8, np.sqrt(7.8e-9)
  rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  scales = np.r_[np.ones(dim - 1), std_small]
  labels = rng.integers(0, 2, 3000)
  class_means = rng.normal(size=(2, dim))

  def draw(n, shift):
    z = rng.normal(size=(n, dim)) * scales
    z[:, -1] += shift
    return (z @ rotation.T).astype(np.float32)

  train = draw(3000, 0.) + (class_means[labels] @ rotation.T).astype(np.float32)
  query_labels = rng.integers(0, 2, 500)
  query_means = (class_means[query_labels] @ rotation.T).astype(np.float32)
  id_query, ood_query = draw(500, 0.) + query_means, draw(500, 6 * std_small) + query_means
  # OpenOOD's MDS (openood/postprocessors/mds_postprocessor.py): class means, then
  # EmpiricalCovariance(assume_centered=False) of the class-centred features.
  means = np.stack([train[labels == c].mean(0) for c in (0, 1)])
  precision = sk_covariance.EmpiricalCovariance(assume_centered=False).fit(
      train - means[labels]).precision_

  def openood_score(x):
    centered = np.float64(x)[:, None] - means[None]
    return -np.einsum('ncd,de,nce->nc', centered, precision, centered).min(-1)

  reference = metrics.ood_metrics(openood_score(id_query), openood_score(ood_query))['auroc']
  assert reference > 0.99
  scorer = scorers.get('mahalanobis')
  stats = scorers.fit(scorer, train, None, labels, None)
  ours = [scorers.score(scorer, stats, x, None) for x in (id_query, ood_query)]
  assert metrics.ood_metrics(*ours)['auroc'] == pytest.approx(reference, abs=0.01)


def test_mahalanobis_handles_one_class(data):
  # One-class runs: every label the same class, whatever its id.
  train = {**data['train'], 'label': np.full(400, 3)}
  scores = _fit_score('mahalanobis', train, data['query'])
  np.testing.assert_allclose(
      scores, -_numpy_class_distances(train['features'], train['label'],
                                      data['query']['features'])[:, 0], rtol=1e-4)
  np.testing.assert_allclose(_fit_score('rmds', train, data['query']), 0., atol=1e-3)


def test_needs_logits_marks_the_head_free_scorers():
  head_free = {s.name for s in scorers.resolve('all') if not s.needs_logits}
  assert head_free == {'gmm', 'knn', 'mahalanobis', 'mahalanobis_mood', 'mds_ensemble',
                       'rmds'}


# --- Registry, hparams, names --------------------------------------------------------------


def test_with_hparams_overrides_and_rejects_unknown_keys():
  knn = scorers.get('knn')
  assert dict(knn.with_hparams(k=3).hparams) == {'k': 3} and knn.hparams['k'] == 50
  with pytest.raises(ValueError, match=r"no hparams \['kk'\]; its hparams: \['k'\]"):
    knn.with_hparams(kk=3)
  with pytest.raises(ValueError, match='none'):
    scorers.get('msp').with_hparams(temperature=2.)
  with pytest.raises(TypeError):
    knn.hparams['k'] = 1  # defaults are read-only


def test_resolve():
  assert [s.name for s in scorers.resolve('all')] == scorers.names()
  assert [s.name for s in scorers.resolve(' knn, msp,,knn ')] == ['knn', 'msp']
  with pytest.raises(KeyError, match='registered scorers: .*mahalanobis_mood'):
    scorers.resolve('msp,nope')
  with pytest.raises(ValueError):
    scorers.resolve(' , ')


def test_unknown_name_error_lists_registered_scorers():
  with pytest.raises(KeyError) as error:
    scorers.get('nope')
  for name in ('msp', 'maxlogit', 'energy', 'mahalanobis_mood', 'knn', 'vim'):
    assert name in str(error.value)


def test_user_registered_scorer_is_usable_by_name(monkeypatch):
  monkeypatch.setattr(scorers.base, '_REGISTRY', dict(scorers.base._REGISTRY))  # others kept
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
  stats = scorers.fit(found, features, None, None, None)
  np.testing.assert_allclose(scorers.score(found, stats, features, None), [10., 2.])
  with pytest.raises(ValueError, match='already registered'):
    scorers.register(scorer)


def test_scorer_returning_keepdims_is_an_error_naming_it(monkeypatch):
  monkeypatch.setattr(scorers.base, '_REGISTRY', dict(scorers.base._REGISTRY))
  scorer = scorers.register(scorers.Scorer(
      name='test_keepdims_norm', fit=lambda features, logits, labels, head: {},
      score=lambda stats, features, logits: jnp.linalg.norm(features, axis=-1, keepdims=True),
      needs_logits=False))
  features = np.array([[3., 4.], [0., 1.], [1., 0.]], np.float32)
  with pytest.raises(ValueError, match=r"'test_keepdims_norm' returned scores of shape \(2, 1\)"):
    scorers.score(scorer, {}, features, None, chunk_size=2)


# --- 8 devices ------------------------------------------------------------------------------

MESH_SCORERS = ('knn', 'mahalanobis_mood', 'mahalanobis', 'rmds', 'vim', 'residual', 'klm',
                'nnguide', 'relation', 'gmm', 'dice')


def _mesh_case_scores(mesh) -> dict[str, np.ndarray]:
  """Scores of the bank scorers; 300 bank rows do not divide into 8 shards, and k=50 is
  more than a shard's rows (and, on 8 devices, than its 16-row blocks)."""
  head = _head(0)
  train, query = _split(1, 300, head), _split(2, 45, head)
  out = {}
  for name in MESH_SCORERS:
    for k in ((5, 50) if name == 'knn' else (None,)):
      scorer = scorers.get(name) if k is None else scorers.get(name).with_hparams(k=k)
      stats = scorers.fit(scorer, train['features'], train['logits'], train['label'], head,
                          mesh=mesh)
      key = name if k is None else f'{name}_{k}'
      out[key] = scorers.score(scorer, stats, query['features'], query['logits'], mesh=mesh,
                               chunk_size=16)
      if name == 'knn':  # the bank really is split: a shard holds 1/8 of the padded rows
        out[f'{key}_shard_rows'] = np.array([s.data.shape[0]
                                             for s in stats['bank'].addressable_shards])
  return out


def test_scores_on_8_devices_equal_1_device(tmp_path):
  out = tmp_path / 'scores.npz'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  subprocess.run([sys.executable, __file__, str(out)], check=True, env=env, cwd=REPO,
                 timeout=300)
  on_8 = dict(np.load(out))
  for name, scores in _mesh_case_scores(mesh=None).items():
    if name.endswith('_shard_rows'):  # 38 rows a shard, in 16-row blocks: 48
      assert (on_8[name] == 48).all() and len(on_8[name]) == 8
    else:
      np.testing.assert_allclose(on_8[name], scores, rtol=1e-5, atol=_atol(name), err_msg=name)


if __name__ == '__main__':
  assert jax.device_count() == 8, jax.devices()
  scorers.bank.BANK_BLOCK = 16  # several blocks a shard: the blocked top-k merge too
  np.savez(sys.argv[1], **_mesh_case_scores(parallel.make_mesh((('data', -1),))))


def test_the_readme_counts_the_registered_scorers():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  assert f'({len(scorers.resolve("all"))} scorers: MOOD' in readme

"""OOD metrics equal scikit-learn's, ties and roc_curve's dropped points included."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mood_jax.ood import metrics


def _sklearn_metrics(id_scores, ood_scores):
  scores = np.r_[id_scores, ood_scores]
  is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
  fpr_ood, tpr_ood, _ = sk_metrics.roc_curve(1 - is_id, -scores)
  fpr_id, tpr_id, _ = sk_metrics.roc_curve(is_id, scores)
  return {
      'auroc': sk_metrics.roc_auc_score(is_id, scores),
      'aupr_in': sk_metrics.average_precision_score(is_id, scores),
      'aupr_out': sk_metrics.average_precision_score(1 - is_id, -scores),
      'fpr95': fpr_ood[np.argmax(tpr_ood >= 0.95)],
      'fpr95_id': fpr_id[np.argmax(tpr_id >= 0.95)],
  }


def _assert_matches_sklearn(id_scores, ood_scores):
  # float32 first: ties are decided on the values the metric actually sees.
  id_scores, ood_scores = np.float32(id_scores), np.float32(ood_scores)
  ours = metrics.ood_metrics(id_scores, ood_scores)
  expected = _sklearn_metrics(id_scores, ood_scores)
  assert set(ours) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(ours[name]), value, rtol=0, atol=1e-6, err_msg=name)


def _collinear_runs(rng, num_runs):
  """Tie groups in runs with an identical (ID, OOD) make-up: collinear ROC points."""
  id_scores, ood_scores, value = [], [], 0
  for _ in range(num_runs):
    num_id, num_ood = rng.integers(0, 3, size=2)
    num_id += num_id + num_ood == 0
    for _ in range(rng.integers(1, 6)):
      id_scores += [value] * num_id
      ood_scores += [value] * num_ood
      value += 1
  return np.array(id_scores), np.array(ood_scores)


@pytest.mark.parametrize('seed', range(4))
def test_continuous_scores(seed):
  rng = np.random.default_rng(seed)
  _assert_matches_sklearn(rng.normal(1, 1, 400), rng.normal(0, 1, 300))


@pytest.mark.parametrize('seed', range(4))
def test_heavily_tied_scores(seed):
  rng = np.random.default_rng(seed)
  _assert_matches_sklearn(rng.integers(0, 5, 300), rng.integers(-1, 3, 200))


@pytest.mark.parametrize('seed', range(4))
def test_collinear_tie_groups(seed):
  _assert_matches_sklearn(*_collinear_runs(np.random.default_rng(seed), 12))


@pytest.mark.parametrize('num_id,num_ood', [(7, 500), (500, 7), (1, 50), (50, 1)])
def test_unequal_set_sizes(num_id, num_ood):
  rng = np.random.default_rng(num_id)
  _assert_matches_sklearn(rng.normal(0.5, 1, num_id), rng.integers(-2, 2, num_ood))


def test_fpr95_uses_only_the_points_roc_curve_keeps():
  # One ID and one OOD per distinct score: every ROC point is collinear, roc_curve keeps
  # only the ends, so the first kept point with TPR >= 95% is the last one (FPR 1, not 0.95).
  scores = np.arange(20)
  values = metrics.ood_metrics(scores, scores)
  assert float(values['fpr95']) == 1.0
  assert float(values['fpr95_id']) == 1.0
  _assert_matches_sklearn(scores, scores)


def test_perfect_separation():
  values = metrics.ood_metrics(np.linspace(1, 2, 30), np.linspace(-2, 0, 40))
  expected = {'auroc': 1., 'aupr_in': 1., 'aupr_out': 1., 'fpr95': 0., 'fpr95_id': 0.}
  assert {k: float(v) for k, v in values.items()} == expected


def test_reversed_scores_are_worst_case():
  values = metrics.ood_metrics(np.linspace(-2, 0, 40), np.linspace(1, 2, 30))
  assert float(values['auroc']) == 0.
  assert float(values['fpr95']) == 1.


def test_accuracy():
  logits = np.array([[2., 1., 0.], [0., 3., 1.], [1., 0., 5.], [4., 0., 0.]])
  assert float(metrics.accuracy(logits, np.array([0, 1, 0, 1]))) == 0.5


def test_all_equal_scores():
  values = metrics.ood_metrics(np.zeros(30), np.zeros(20))
  assert float(values['auroc']) == 0.5
  _assert_matches_sklearn(np.full(30, 1.5), np.full(20, 1.5))


@pytest.mark.parametrize('empty', ['ID', 'OOD'])
def test_empty_set_is_an_error(empty):
  scores = {'ID': np.ones(5), 'OOD': np.zeros(5)}
  scores[empty] = np.zeros(0)
  with pytest.raises(ValueError, match=f'the {empty} set is empty'):
    metrics.ood_metrics(scores['ID'], scores['OOD'])


def test_non_finite_scores_are_an_error():
  id_scores = np.array([1., np.nan, 2., np.inf])
  with pytest.raises(ValueError, match='2 of 4 ID scores are not finite'):
    metrics.ood_metrics(id_scores, np.zeros(3))
  with pytest.raises(ValueError, match='1 of 3 OOD scores'):
    metrics.ood_metrics(np.ones(3), np.array([0., -np.inf, 1.]))

"""OOD metrics equal OpenOOD's sklearn formulas (main at 4a72488) and MOOD's FPR@95, ties included."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mood_jax.ood import metrics


def _sklearn_metrics(id_scores, ood_scores):
  """OpenOOD v1.5's auc_and_fpr_recall (openood/evaluators/metrics.py) and MOOD's get_fpr
  (MOODv1/ood_utils.py) on distances = -score, written out from their definitions."""
  scores = np.r_[id_scores, ood_scores]
  is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
  fpr_ood, tpr_ood, _ = sk_metrics.roc_curve(1 - is_id, -scores)
  precision_in, recall_in, _ = sk_metrics.precision_recall_curve(is_id, scores)
  precision_out, recall_out, _ = sk_metrics.precision_recall_curve(1 - is_id, -scores)
  return {
      'auroc': sk_metrics.auc(fpr_ood, tpr_ood),
      'aupr_in': sk_metrics.auc(recall_in, precision_in),
      'aupr_out': sk_metrics.auc(recall_out, precision_out),
      'fpr95': fpr_ood[np.argmax(tpr_ood >= 0.95)],
      'fpr95_id': np.sum(-ood_scores < np.percentile(-id_scores, 95)) / len(ood_scores),
  }


def _assert_matches_sklearn(id_scores, ood_scores, dtype=np.float32):
  id_scores, ood_scores = np.asarray(id_scores, dtype), np.asarray(ood_scores, dtype)
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
  _assert_matches_sklearn(scores, scores)


def test_fpr95_id_is_moods_strict_percentile_rule():
  # ID 0..19: the 5th percentile is 0.95, so the OOD scores 1..19 (19 of 20) pass it.
  assert metrics.ood_metrics(np.arange(20.), np.arange(20.))['fpr95_id'] == 0.95
  # All equal: no OOD score is strictly above the threshold (ODIN's rule gave 1.0).
  assert metrics.ood_metrics(np.zeros(30), np.zeros(20))['fpr95_id'] == 0.0
  # Integer ties: ID percentile(5) of [0, 1, 1, 1] is 0.15; OOD 1s pass, 0s do not.
  assert metrics.ood_metrics(np.array([0, 1, 1, 1]), np.array([0, 0, 1]))['fpr95_id'] == (
      pytest.approx(1 / 3))


@pytest.mark.parametrize('id_scores,ood_scores,aupr_in', [
    ([1, 1], [1, 0], (1 + 2 / 3) / 2),  # average precision: 2/3
    ([0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9], (1 + 3 / 7) / 2),  # average precision: 3/7
])
def test_aupr_is_the_trapezoid_rule_not_average_precision(id_scores, ood_scores, aupr_in):
  """Small tied sets, worked by hand through (recall, precision) = (0, 1) and every distinct
  threshold: there trapezoids and average precision differ most."""
  values = metrics.ood_metrics(np.array(id_scores), np.array(ood_scores))
  assert values['aupr_in'] == pytest.approx(aupr_in, abs=1e-6)
  _assert_matches_sklearn(id_scores, ood_scores)


def test_float64_scores_keep_their_precision():
  # Around 1e8 float32 resolves steps of 8: a cast merges most of these scores into ties.
  rng = np.random.default_rng(0)
  id_scores, ood_scores = 1e8 + rng.normal(0.3, 1, 500), 1e8 + rng.normal(0, 1, 400)
  _assert_matches_sklearn(id_scores, ood_scores, dtype=np.float64)


@pytest.mark.parametrize('shape', [(3, 1), (1, 3), ()])
def test_scores_not_shaped_n_are_an_error(shape):
  scores = np.arange(np.prod(shape, dtype=int), dtype=np.float32).reshape(shape)
  with pytest.raises(ValueError, match=r'ID scores have shape .*expected one score per sample'):
    metrics.ood_metrics(scores, np.zeros(2, np.float32))


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
  assert values['aupr_in'] == pytest.approx(1 - (1 - 30 / 50) / 2)
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

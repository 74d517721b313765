"""select_hparams tries the grid on validation data and keeps the best, first of equals."""

import jax.numpy as jnp
import numpy as np
import pytest

from mood_jax.ood import scorers, sweep


def _column_scorer():
  """Scores by one feature column, the hparam; unregistered, so unjitted."""
  return scorers.Scorer(
      name='test_column', needs_logits=False, hparams={'column': 0, 'sign': 1.},
      fit=lambda features, logits, labels, head, column, sign: {},
      score=lambda stats, features, logits, column, sign: sign * jnp.asarray(features)[:, column])


def _split(rng, num_rows, shift):
  """Column 1 separates ID (shift 0) from OOD (shift -3); columns 0 and 2 are noise."""
  features = rng.normal(size=(num_rows, 3)).astype(np.float32)
  features[:, 1] += shift
  return {'features': features, 'logits': None, 'label': np.zeros(num_rows, int)}


@pytest.fixture
def splits():
  rng = np.random.default_rng(0)
  return _split(rng, 50, 0.), _split(rng, 200, 0.), _split(rng, 150, -3.)


def test_picks_the_clearly_best_setting(splits):
  grid = {'column': [0, 1, 2], 'sign': [-1., 1.]}
  best, trials = sweep.select_hparams(_column_scorer(), grid, *splits)
  assert best == {'column': 1, 'sign': 1.}
  assert [(t['column'], t['sign']) for t in trials] == [(c, s) for c in (0, 1, 2)
                                                         for s in (-1., 1.)]
  assert set(trials[0]) == {'column', 'sign', 'auroc', 'aupr_in', 'aupr_out', 'fpr95',
                            'fpr95_id'}
  assert max(t['auroc'] for t in trials) == trials[3]['auroc'] > 0.95


def test_lower_is_better_for_fpr95(splits):
  best, _ = sweep.select_hparams(_column_scorer(), {'column': [0, 1, 2], 'sign': [-1., 1.]},
                                 *splits, metric='fpr95')
  assert best == {'column': 1, 'sign': 1.}


def test_ties_go_to_the_first_in_grid_order(splits):
  train, id_val, ood_val = splits
  for split in splits:
    split['features'][:, 2] = split['features'][:, 1]  # column 2 is as good as column 1
  best, trials = sweep.select_hparams(_column_scorer(), {'column': [2, 1, 0]}, train, id_val,
                                      ood_val)
  assert trials[0]['auroc'] == trials[1]['auroc']
  assert best == {'column': 2}


def test_unknown_hparam_or_metric_is_an_error(splits):
  with pytest.raises(ValueError, match='no hparams'):
    sweep.select_hparams(_column_scorer(), {'col': [0]}, *splits)
  with pytest.raises(ValueError, match='metric'):
    sweep.select_hparams(_column_scorer(), {'column': [0]}, *splits, metric='accuracy')


def test_registered_scorer_with_a_head():
  rng = np.random.default_rng(1)
  head = {'kernel': rng.normal(size=(8, 4)).astype(np.float32), 'bias': np.zeros(4, np.float32)}

  def split(num_rows, scale):
    features = (rng.normal(size=(num_rows, 8)) * scale).astype(np.float32)
    return {'features': features, 'logits': features @ head['kernel'],
            'label': np.zeros(num_rows, int)}

  train, id_val, ood_val = split(100, 1.), split(40, 1.), split(40, 5.)
  best, trials = sweep.select_hparams(scorers.get('react'), {'percentile': [50, 90, 99]},
                                      {**train, 'head': head}, id_val, ood_val)
  assert [t['percentile'] for t in trials] == [50, 90, 99]
  assert max(t['auroc'] for t in trials) == trials[[50, 90, 99].index(best['percentile'])]['auroc']


def test_fit_on_id_validation_fits_the_held_out_part_only_for_the_named_scorers():
  from configs import digits
  from mood_jax.stages import evaluate
  cfg = digits.get_config('smoke').evaluate
  cfg.fit_on_id_validation = 'react, klm'
  id_train = {'features': np.arange(100.)[:, None], 'label': np.zeros(100, int)}
  held_out = evaluate.fit_rows('react', cfg, {'id_train': id_train}, seed=0)
  assert len(held_out['label']) == 20  # sweep_id_fraction 0.2
  # The same rows the sweeps validate on, none of those a sweep fits on.
  _, id_val = evaluate.hold_out(id_train, 0.2, 0)
  np.testing.assert_array_equal(held_out['features'], id_val['features'])
  assert evaluate.fit_rows('klm', cfg, {'id_train': id_train}, seed=0)['features'].shape == (
      20, 1)
  assert evaluate.fit_rows('knn', cfg, {'id_train': id_train}, seed=0) is id_train
  # With an ID validation split, that split, which the model never trained on.
  id_val = {'features': np.ones((7, 1)), 'label': np.zeros(7, int)}
  assert evaluate.fit_rows('react', cfg, {'id_train': id_train, 'id_val': id_val}, 0) is id_val


def test_id_train_augment_reaches_moods_bank_only():
  """MOOD fits its Gaussian on augmented ID-train features; every other scorer fits on the
  un-augmented images, as OpenOOD does."""
  from configs import digits
  from mood_jax.stages import evaluate
  cfg = digits.get_config('smoke').evaluate
  cfg.id_train_augment = True
  both = evaluate.id_train_banks(cfg, ['mahalanobis_mood', 'knn', 'vim'])
  assert both == {'id_train': False, evaluate.AUGMENTED_ID_TRAIN: True}
  sets = {'id_train': {'label': np.zeros(3)}, evaluate.AUGMENTED_ID_TRAIN: {'label': np.ones(3)}}
  assert evaluate.fit_rows('mahalanobis_mood', cfg, sets, 0) is sets[evaluate.AUGMENTED_ID_TRAIN]
  for name in ('knn', 'vim', 'react'):
    assert evaluate.fit_rows(name, cfg, sets, 0) is sets['id_train']
  # Only MOOD's scorer: one pass over ID train, augmented; augmentation off: one, plain.
  assert evaluate.id_train_banks(cfg, ['mahalanobis_mood']) == {
      evaluate.AUGMENTED_ID_TRAIN: True}
  cfg.id_train_augment = False
  assert evaluate.id_train_banks(cfg, ['mahalanobis_mood', 'knn']) == {'id_train': False}

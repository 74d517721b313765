"""The logit fine-tune stage's pieces: flooding, sample masking, top-k masks, gamma."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import digits
from mood_jax.train import metrics_log, optim
from mood_jax.models import weight_mask
from mood_jax.stages import logit_ft


def _ce(w, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()


@pytest.mark.parametrize('gamma_offset', [-0.5, 0.5])
def test_flooding_gradient_is_ce_gradient_or_its_negation(gamma_offset):
  rng = np.random.default_rng(0)
  w, x = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(8, 4)))
  y = jnp.asarray(rng.integers(0, 3, 8))
  ce = float(_ce(w, x, y))
  gamma = ce + gamma_offset  # offset < 0: CE above gamma; > 0: CE below gamma

  def um(w):
    return logit_ft.flooding(_ce(w, x, y), gamma)[0]

  ce_grad, um_grad = jax.grad(_ce)(w, x, y), jax.grad(um)(w)
  flooded = bool(logit_ft.flooding(_ce(w, x, y), gamma)[1])
  assert flooded == (gamma_offset > 0)
  np.testing.assert_array_equal(um_grad, -ce_grad if flooded else ce_grad)
  assert float(um(w)) == pytest.approx(abs(ce - gamma) + gamma)


@pytest.mark.parametrize('batch,ratio', [(16, 0.25), (10, 0.1), (7, 0.5), (8, 0.0)])
def test_sample_mask_drops_exactly_the_largest_kl(batch, ratio):
  kl = jnp.asarray(np.random.default_rng(batch).permutation(batch).astype(np.float32))
  weights = np.asarray(logit_ft.typical_sample_weights(kl, ratio))
  num_dropped = round(ratio * batch)
  assert (weights == 0).sum() == num_dropped
  assert set(np.flatnonzero(weights == 0)) == set(np.argsort(-np.asarray(kl))[:num_dropped])


@pytest.mark.parametrize('shape,keep', [((32, 16), 0.8), ((3, 3, 2, 5), 0.965), ((7,), 0.5)])
def test_topk_mask_keeps_exactly_k_of_the_largest(shape, keep):
  scores = jax.random.normal(jax.random.key(0), shape)
  mask = np.asarray(weight_mask.topk_mask(scores, keep))
  k = weight_mask.num_kept(int(np.prod(shape)), keep)
  assert mask.sum() == k and set(np.unique(mask)) <= {0., 1.}
  threshold = np.sort(np.abs(np.asarray(scores)).ravel())[-k]
  assert np.all(np.abs(np.asarray(scores))[mask == 1] >= threshold)


def test_topk_mask_is_exact_under_ties():
  mask = weight_mask.topk_mask(jnp.ones((10, 10)), 0.35)
  assert float(mask.sum()) == 35


def test_straight_through_gradient_reaches_the_scores():
  weights = {'dense': {'kernel': jnp.arange(1., 13.).reshape(4, 3), 'bias': jnp.ones(3)}}
  scores = {'dense': {'kernel': jax.random.normal(jax.random.key(1), (4, 3))}}

  def output(scores):
    masked = weight_mask.apply_masks(weights, weight_mask.straight_through_masks(scores, 0.5))
    return jnp.sum(jnp.ones(4) @ masked['dense']['kernel']), masked

  (_, masked), grad = jax.value_and_grad(output, has_aux=True)(scores)
  hard = weight_mask.topk_mask(scores['dense']['kernel'], 0.5)
  np.testing.assert_array_equal(masked['dense']['kernel'], weights['dense']['kernel'] * hard)
  np.testing.assert_array_equal(masked['dense']['bias'], weights['dense']['bias'])
  # d/ds sum(w * m(|s|)), straight through to |s|, is w * sign(s), masked or not.
  np.testing.assert_array_equal(grad['dense']['kernel'],
                                weights['dense']['kernel'] * np.sign(scores['dense']['kernel']))


@pytest.mark.parametrize('score', [-0.8, 0.8])
def test_straight_through_step_grows_the_score_of_a_helpful_weight(score):
  """Loss = -w * m: removing the weight raises the loss, so one SGD step (lr 0.1) must
  take |s| from 0.8 to 0.9 whatever the sign of s (UM's straight-through on |s|)."""
  weights = {'dense': {'kernel': jnp.ones((1, 1))}}

  def loss(scores):
    masked = weight_mask.apply_masks(weights, weight_mask.straight_through_masks(scores, 1.0))
    return -jnp.sum(masked['dense']['kernel'])

  scores = {'dense': {'kernel': jnp.full((1, 1), score)}}
  stepped = scores['dense']['kernel'] - 0.1 * jax.grad(loss)(scores)['dense']['kernel']
  np.testing.assert_allclose(np.abs(stepped), 0.9, rtol=1e-6)


def test_random_masks_cover_every_kernel_at_the_keep_ratio():
  params = {'a': {'kernel': jnp.ones((20, 10)), 'bias': jnp.ones(10)},
            'b': {'c': {'kernel': jnp.ones((2, 2, 3, 4))}}, 'scale': jnp.ones(3)}
  masks = traverse_util.flatten_dict(weight_mask.random_masks(jax.random.key(0), params, 0.9))
  assert set(masks) == {('a', 'kernel'), ('b', 'c', 'kernel')}
  assert float(masks['a', 'kernel'].sum()) == 180 and float(masks['b', 'c', 'kernel'].sum()) == 43


@pytest.mark.parametrize('flax_shape,torch_shape,fan_in', [
    ((64, 40), (40, 64), 64),                     # Dense(40) on 64 inputs; torch Linear(64, 40)
    ((3, 3, 16, 32), (32, 16, 3, 3), 3 * 3 * 16),  # Conv 3x3, 16 -> 32 channels
])
def test_umap_scores_start_as_ums_kaiming_uniform(flax_shape, torch_shape, fan_in):
  """UM's scores are torch's kaiming_uniform_(a=sqrt(5)) on the weight (Unleashing-Mask
  utils/conv_type.py): U(+-1/sqrt(fan_in)). Ours on the Flax layout of the same layer fill
  the same interval: max |s| within 1% under the bound (the chance of a miss is below
  0.99 ** 2560), in both cases, and never beyond."""
  torch = pytest.importorskip('torch')
  bound = 1 / np.sqrt(fan_in)
  reference = torch.empty(torch_shape)
  torch.manual_seed(0)
  torch.nn.init.kaiming_uniform_(reference, a=np.sqrt(5))
  params = {'layer': {'kernel': jnp.zeros(flax_shape), 'bias': jnp.zeros(flax_shape[-1])}}
  scores = weight_mask.init_scores(jax.random.key(0), params, lambda path: True)
  assert set(traverse_util.flatten_dict(scores)) == {('layer', 'kernel')}
  for drawn in (reference.numpy(), np.asarray(scores['layer']['kernel'])):
    assert 0.99 * bound <= np.abs(drawn).max() <= bound
    assert abs(drawn.mean()) < 0.05 * bound  # symmetric


def _config(**logit_ft_overrides):
  cfg = dict(trainable='all', last_n_blocks=1, umap='none', umap_keep_ratio=0.8)
  cfg.update(logit_ft_overrides)
  return ml_collections.ConfigDict({'logit_ft': cfg})


@pytest.mark.parametrize('trainable,expected', [
    ('all', {'encoder/patch_embed/kernel', 'encoder/block0/fc1/kernel',
             'encoder/block1/fc1/kernel', 'fc_norm/scale', 'head/kernel'}),
    ('head', {'head/kernel'}),
    ('last_n_blocks', {'encoder/block1/fc1/kernel', 'fc_norm/scale', 'head/kernel'}),
])
def test_trainable_selection(trainable, expected):
  paths = ['encoder/patch_embed/kernel', 'encoder/block0/fc1/kernel',
           'encoder/block1/fc1/kernel', 'fc_norm/scale', 'head/kernel']
  cfg = _config(trainable=trainable).logit_ft
  assert {p for p in paths if logit_ft.adapts_layer(p, cfg, depth=2)} == expected


def test_frozen_params_get_no_update():
  params = {'model': {'encoder': {'block0': {'fc1': {'kernel': jnp.ones((2, 2))}}},
                      'head': {'kernel': jnp.ones((2, 2))}}}
  cfg = ml_collections.ConfigDict(dict(lr=0.1, min_lr=0.0, warmup_steps=0, num_steps=10,
                                       b1=0.9, b2=0.999, weight_decay=0.1, grad_clip=0.0))
  tx = optim.train_only(optim.make_optimizer(cfg, depth=1), lambda path: 'head' in path)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.any(updates['model']['encoder']['block0']['fc1']['kernel'])
  assert np.all(updates['model']['head']['kernel'] != 0)


def test_layer_decay_leaves_the_umap_scores_at_the_stages_lr():
  """UM trains its scores at one lr (Unleashing-Mask utils/net_utils.py get_optimizer): with
  layer_decay=0.5 and umap='both', the first AdamW step moves every score by lr, whatever
  its block, while the weights of block 0 still move by lr * 0.5 ** depth."""
  config = digits.get_config('smoke')
  config.logit_ft.update(umap='both', layer_decay=0.5, lr=0.1, min_lr=0.1, warmup_steps=0,
                         weight_decay=0.0)
  stage = logit_ft.describe(config)
  params = jax.tree.map(lambda p: jnp.zeros(p.shape), jax.eval_shape(stage.init_params))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(stage.tx.update)(grads, jax.jit(stage.tx.init)(params), params)
  score_updates = traverse_util.flatten_dict(updates['scores'], sep='/')
  assert 'encoder/block0/attn/proj/kernel' in score_updates
  for path, update in score_updates.items():
    np.testing.assert_allclose(update, -0.1, rtol=1e-4, err_msg=path)
  depth = stage.model.encoder.depth
  np.testing.assert_allclose(updates['model']['encoder']['block0']['attn']['proj']['kernel'],
                             -0.1 * 0.5 ** depth, rtol=1e-4)


def _ce_against(logits, targets):
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -(targets * log_probs).sum(-1)


def _smoothed_ce(logits, labels, smoothing):
  targets = (1 - smoothing) * np.eye(logits.shape[-1])[labels] + smoothing / logits.shape[-1]
  return _ce_against(logits, targets)


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class _Linear:
  def apply(self, variables, x):
    p = variables['params']['head']
    return x @ p['kernel'] + p['bias'], {}


def _fake_training_set(monkeypatch, clean, augmented, labels):
  """extraction.extract over ID train, as features of a linear model: `augmented` stands for
  one draw of the training transforms, `clean` for the eval ones. Returns the calls' list."""
  calls = []

  def fake_extract(forward, params, data_cfg, which, mesh, batch_size, augment=False, seed=0):
    assert which == 'id_train'
    calls.append({'augment': augment, 'seed': seed})
    x = augmented if augment else clean
    return {'logits': np.asarray(forward(params, x)[1]), 'label': labels}

  monkeypatch.setattr(logit_ft.extraction, 'extract', fake_extract)
  monkeypatch.setattr(logit_ft.extraction, 'make_forward',
                      lambda model, mesh: lambda p, x: (x, model.apply({'params': p}, x)[0]))
  return calls


def _gamma_config(**logit_ft_overrides):
  cfg = dict(batch_size=8, gamma_from='masked_model', weight_keep_ratio=0.75,
             gamma_quantile=0.5, gamma=0., label_smoothing=0.0, teacher_alpha=1.0,
             augment=True, gamma_transforms='eval')
  cfg.update(logit_ft_overrides)
  return ml_collections.ConfigDict(dict(seed=3, data={}, logit_ft=cfg))


def _masked_kernel(params, keep_ratio):
  """The kernel of estimate_gamma's masked copy: the same stream and keep ratio."""
  key = jax.random.fold_in(jax.random.key(3), 4)
  mask = np.asarray(weight_mask.random_masks(key, params, keep_ratio)['head']['kernel'])
  return np.asarray(params['head']['kernel']) * mask, mask


def _linear_problem(seed=0):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(50, 6)).astype(np.float32)
  labels = rng.integers(0, 3, 50)
  params = {'head': {'kernel': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                     'bias': jnp.zeros(3)}}
  return features, labels, params


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_gamma_from_masked_model_matches_direct_computation(monkeypatch, smoothing):
  """estimate_gamma == mean CE of the same random-masked weights, computed by hand."""
  features, labels, params = _linear_problem()
  _fake_training_set(monkeypatch, features, features, labels)
  config = _gamma_config(label_smoothing=smoothing)
  gamma = logit_ft.estimate_gamma(config, _Linear(), params, mesh=None)

  # By hand: 18 kernel entries -> 14 kept (round(13.5) == 14).
  masked_kernel, mask = _masked_kernel(params, 0.75)
  assert mask.sum() == 14
  expected = _smoothed_ce(features @ masked_kernel, labels, smoothing).mean()
  assert gamma == pytest.approx(expected, rel=1e-5)
  losses = _smoothed_ce(features @ np.asarray(params['head']['kernel']), labels, smoothing)
  assert gamma != pytest.approx(losses.mean())

  config.logit_ft.gamma_from = 'quantile'
  assert logit_ft.estimate_gamma(config, _Linear(), params, None) == pytest.approx(
      np.quantile(losses, 0.5), rel=1e-5)
  config.logit_ft.gamma_from, config.logit_ft.gamma = 'fixed', 0.7
  assert logit_ft.estimate_gamma(config, _Linear(), params, None) == 0.7


@pytest.mark.parametrize('gamma_from', ['masked_model', 'quantile'])
def test_gamma_reads_the_stages_training_transforms_unless_told_eval(monkeypatch, gamma_from):
  """UM's estimate_loss.py measures gamma over its augmented train loader: by default
  ('train') the CEs are those of one draw of the stage's own training transforms, with the
  run's seed; 'eval' keeps the clean images; a stage that trains un-augmented reads them
  clean either way."""
  features, labels, params = _linear_problem()
  augmented = features + np.random.default_rng(1).normal(size=features.shape).astype(np.float32)
  calls = _fake_training_set(monkeypatch, features, augmented, labels)
  kernel = (_masked_kernel(params, 0.75)[0] if gamma_from == 'masked_model'
            else np.asarray(params['head']['kernel']))
  reduce = np.mean if gamma_from == 'masked_model' else functools.partial(np.quantile, q=0.5)

  def gamma(**overrides):
    """(gamma, [(augment, seed) of each pass over ID train])"""
    calls.clear()
    value = logit_ft.estimate_gamma(_gamma_config(gamma_from=gamma_from, **overrides),
                                    _Linear(), params, None)
    return value, [(call['augment'], call['seed']) for call in calls]

  on_train = pytest.approx(reduce(_smoothed_ce(augmented @ kernel, labels, 0.0)), rel=1e-5)
  on_clean = pytest.approx(reduce(_smoothed_ce(features @ kernel, labels, 0.0)), rel=1e-5)
  assert on_train != on_clean
  assert gamma(gamma_transforms='train') == (on_train, [(True, 3)])  # one pass, the run's seed
  assert gamma(gamma_transforms='train', augment='crop') == (on_train, [('crop', 3)])
  assert gamma(gamma_transforms='eval') == (on_clean, [(False, 3)])
  assert gamma(gamma_transforms='train', augment=False) == (on_clean, [(False, 3)])


def test_gamma_is_measured_on_the_teacher_mixed_targets_it_floods(monkeypatch):
  """With teacher_alpha < 1 the flooded loss is CE against 0.9 one-hot + 0.1 teacher, whose
  floor is higher than one-hot CE's: logits [5, 0, 0] for label 0 give 0.0134 against the
  label, 0.0200 against the mixed targets (issue 32). gamma must be the latter. The masked
  copy's teacher is the unmasked model, as in training."""
  # The worked example: a bias-only model (no mask reaches a bias), teacher = student.
  labels = np.zeros(4, np.int64)
  features = np.zeros((4, 2), np.float32)
  params = {'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.array([5., 0., 0.])}}
  _fake_training_set(monkeypatch, features, features, labels)
  config = _gamma_config(teacher_alpha=0.9)
  assert logit_ft.estimate_gamma(config, _Linear(), params, None) == pytest.approx(
      0.0200, abs=5e-5)
  config.logit_ft.teacher_alpha = 1.0
  assert logit_ft.estimate_gamma(config, _Linear(), params, None) == pytest.approx(
      0.0134, abs=5e-5)

  # A kernel the mask changes: student = masked copy, teacher = the model as it is.
  features, labels, params = _linear_problem()
  _fake_training_set(monkeypatch, features, features, labels)
  kernel = np.asarray(params['head']['kernel'])
  masked_kernel, _ = _masked_kernel(params, 0.75)
  targets = 0.9 * np.eye(3)[labels] + 0.1 * _softmax(features @ kernel)
  expected = _ce_against(features @ masked_kernel, targets).mean()
  assert logit_ft.estimate_gamma(_gamma_config(teacher_alpha=0.9), _Linear(), params,
                                 None) == pytest.approx(expected, rel=1e-5)


def test_flooded_fraction_counts_the_steps_of_each_logged_window(tmp_path):
  """Each training row holds the mean of `flooded` over the steps since the stage's last row
  (windows of 2, 2 and 1 steps here, after gamma's row at step 0), so the stage's fraction is
  (0.5 * 2 + 1 * 2 + 0 * 1) / 5; other stages' rows and evaluation rows do not count."""
  workdir = str(tmp_path)
  assert logit_ft.flooded_fraction(workdir) is None
  with metrics_log.Writer(workdir, 'finetune', first_step=1) as writer:
    writer.write(3, {'loss': 1.0})
  with metrics_log.Writer(workdir, 'logit_ft', first_step=0) as writer:
    writer.write(0, {'gamma': 0.3})
  with metrics_log.Writer(workdir, 'logit_ft', first_step=1) as writer:
    for step, flooded in ((2, 0.5), (4, 1.0), (5, 0.0)):
      writer.write(step, {'loss': 0.3, 'flooded': flooded})
    writer.write(4, {'id_accuracy': 0.9}, kind='eval')
  assert logit_ft.flooded_fraction(workdir) == pytest.approx(0.6)


def test_flooding_acts_on_the_whole_batch_whatever_the_accumulation():
  """gamma lies between the two micro-batches' CEs, above their mean: the whole batch is
  flooded (CE ascends), though flooding each micro-batch would descend on one of them. The
  loss and the update are those of one batch for 1, 2 and 4 micro-batches."""
  from mood_jax import parallel
  from mood_jax.train import loop as train_loop, stage as training_stage
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  params = {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  # Micro-batches are strided rows: with 2, rows 0, 2, 4, 6 and rows 1, 3, 5, 7.
  micro_ce = [float(_ce(params['w'], x[i::2], y[i::2])) for i in range(2)]
  mean_ce = float(_ce(params['w'], x, y))
  gamma = mean_ce + 0.1
  assert min(micro_ce) < gamma < max(micro_ce)
  cfg = ml_collections.ConfigDict(dict(loss='um', beta=1.0))
  batch_loss = logit_ft.make_batch_loss(cfg, gamma)

  def loss_fn(params, batch, rng):
    del rng
    return _ce(params['w'], batch['image'], batch['label']), {}

  mesh = parallel.make_mesh((('data', -1),))
  results = {}
  for micro_batches in (1, 2, 4):
    stage = training_stage.TrainingStage(
        name='logit_ft', cfg=ml_collections.ConfigDict(dict(grad_accum_steps=micro_batches)),
        model=None, init_params=lambda: params, tx=optax.sgd(0.5), lr_schedule=None,
        loss_fn=loss_fn, rng=jax.random.key(0), batch_loss=batch_loss)
    init, _, shardings = train_loop.abstract_state(stage, parallel.Placement(mesh))
    step = train_loop.make_train_step(stage, shardings, mesh)
    state, metrics = step(jax.jit(init, out_shardings=shardings)(), {'image': x, 'label': y})
    results[micro_batches] = (np.asarray(state.params['w']), float(metrics['loss']),
                              float(metrics['flooded']))
  # By hand: the flooded loss is 2 gamma - CE and the step ascends the CE's gradient.
  expected_w = params['w'] + 0.5 * jax.grad(_ce)(params['w'], x, y)
  for w, loss, flooded in results.values():
    assert flooded == 1.0
    assert loss == pytest.approx(2 * gamma - mean_ce, rel=1e-6)
    np.testing.assert_allclose(w, expected_w, rtol=1e-5, atol=1e-6)

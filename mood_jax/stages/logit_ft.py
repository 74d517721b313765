"""Stage 3: logit fine-tune under Unleashing Mask's loss constraint (UM, UMAP).

Starts from the finetune checkpoint and fine-tunes on ID data so that the model forgets
the atypical samples it memorised late in training (../shared/docs/um.md). Losses
(`logit_ft.loss`):
- 'um': batch-level flooding, |beta * mean CE - gamma| + gamma: below gamma the step
  ascends CE;
- 'sample_mask': per batch, the CE of the samples with the largest KL(full || masked
  copy) is dropped (the masked-atypical-sample loss, per sample);
- 'ce': no constraint; the baseline, and what UM's public README command actually runs.
Any of them can train against logits-based targets alpha * one_hot + (1 - alpha) *
softmax(teacher), the teacher being the finetuned model (`teacher_alpha` < 1).

For 'um', gamma is the mean CE of a masked copy of the finetuned model (`weight_keep_ratio`
of every kernel kept at random), a quantile of its per-sample training CEs, or a fixed
value. It is written to WORKDIR/logit_ft_gamma.json and reused on resume.

UMAP (`umap` = 'scores' or 'both') learns a top-k mask per kernel through straight-through
scores; the checkpoint holds {'model': weights, 'scores': scores} and the evaluated model
is the weights under their masks.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mood_jax import inference, metrics_log, optim, train_loop
from mood_jax.data import input_pipeline
from mood_jax.errors import UserError
from mood_jax.models import weight_mask
from mood_jax.stages import finetune

NAME = 'logit_ft'
LOSSES = ('um', 'sample_mask', 'ce')
GAMMA_SOURCES = ('masked_model', 'quantile', 'fixed')
UMAP_MODES = ('none', 'scores', 'both')
TRAINABLE = ('all', 'head', 'last_n_blocks')


def check_config(config: ml_collections.ConfigDict, depth: int) -> None:
  """This stage's config errors, before anything runs."""
  cfg = config.logit_ft
  for field, valid in (('loss', LOSSES), ('gamma_from', GAMMA_SOURCES),
                       ('umap', UMAP_MODES), ('trainable', TRAINABLE)):
    if cfg[field] not in valid:
      raise UserError(f'unknown logit_ft.{field} {cfg[field]!r}: valid choices are '
                      f'{", ".join(valid)}')
  for field, low, high in (('weight_keep_ratio', 0, 1), ('umap_keep_ratio', 0, 1),
                           ('teacher_alpha', 0, 1), ('sample_mask_ratio', 0, 1),
                           ('gamma_quantile', 0, 1)):
    if not low <= cfg[field] <= high:
      raise UserError(f'logit_ft.{field}={cfg[field]} is outside [{low}, {high}]')
  if cfg.weight_keep_ratio == 0 or cfg.umap_keep_ratio == 0 or cfg.sample_mask_ratio == 1:
    raise UserError('logit_ft: a keep ratio of 0 (or sample_mask_ratio of 1) leaves nothing '
                    'to train on; use a value inside (0, 1)')
  if cfg.trainable == 'last_n_blocks' and not 1 <= cfg.last_n_blocks <= depth:
    raise UserError(f'logit_ft.last_n_blocks={cfg.last_n_blocks} must be in [1, {depth}] '
                    f'(the model has {depth} blocks)')


def adapts_layer(path: str, cfg: ml_collections.ConfigDict, depth: int) -> bool:
  """Whether the classifier param at '/'-joined `path` is in the part this stage adapts."""
  if cfg.trainable == 'all' or path.startswith('head/'):
    return True
  # 'last_n_blocks': the last n blocks, the final norm and the head (layer ids > depth - n).
  return cfg.trainable == 'last_n_blocks' and optim.layer_id(path, depth) > depth - cfg.last_n_blocks


def setup(config: ml_collections.ConfigDict):
  """(model, init_params, optimizer, lr schedule); params are {'model'[, 'scores']}."""
  cfg = config.logit_ft
  model, classifier_init = finetune.classifier(config, cfg.drop_path)
  depth = model.encoder.depth

  def init_params():
    params = {'model': classifier_init()}
    if cfg.umap != 'none':
      params['scores'] = weight_mask.init_scores(
          jax.random.fold_in(jax.random.key(config.seed), 3), params['model'],
          lambda path: adapts_layer('/'.join(path), cfg, depth))
    return params

  def is_trainable(path: str) -> bool:
    part, _, rest = path.partition('/')
    if part == 'scores':  # scores exist only for the adapted kernels
      return True
    return cfg.umap != 'scores' and adapts_layer(rest, cfg, depth)

  tx = optim.train_only(optim.make_optimizer(cfg, depth), is_trainable)
  return model, init_params, tx, optim.make_schedule(cfg)


def classifier_params(params: dict, umap_keep_ratio: float) -> dict:
  """The classifier's effective weights: each kernel under its UMAP mask, if any."""
  if 'scores' not in params:
    return params['model']
  masks = weight_mask.straight_through_masks(params['scores'], umap_keep_ratio)
  return weight_mask.apply_masks(params['model'], masks)


def flooding(mean_loss: jax.Array, gamma: float, beta: float = 1.0):
  """(|beta * loss - gamma| + gamma, whether the gradient is reversed) (Ishida et al.)."""
  scaled = beta * mean_loss
  return jnp.abs(scaled - gamma) + gamma, scaled < gamma


def typical_sample_weights(kl: jax.Array, drop_ratio: float) -> jax.Array:
  """[B] weights: 0 for the round(drop_ratio * B) samples with the largest KL, else 1."""
  num_dropped = round(drop_ratio * kl.shape[0])
  most_sensitive = jnp.argsort(-kl, stable=True)[:num_dropped]
  return jnp.ones_like(kl).at[most_sensitive].set(0.)


def _kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """Per-row KL(softmax(p) || softmax(q))."""
  log_p, log_q = jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def make_loss_fn(model, cfg: ml_collections.ConfigDict, gamma: float | None):
  def loss_fn(params, batch, rng):
    weights = classifier_params(params, cfg.umap_keep_ratio)
    dropout_rng, mask_rng = jax.random.split(rng)
    logits, _ = model.apply({'params': weights}, batch['image'], train=True,
                            rngs={'dropout': dropout_rng})
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]),
                                  cfg.label_smoothing)
    if cfg.teacher_alpha < 1:
      teacher = jax.nn.softmax(batch['teacher_logits'].astype(jnp.float32))
      targets = cfg.teacher_alpha * targets + (1 - cfg.teacher_alpha) * teacher
    ce = optax.softmax_cross_entropy(logits, targets)
    aux = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']), 'ce': ce.mean()}
    if cfg.loss == 'sample_mask':
      # A fresh masked copy per step, same dropout: the KL measures the weight mask alone.
      masked = jax.lax.stop_gradient(weight_mask.apply_masks(
          weights, weight_mask.random_masks(mask_rng, weights, cfg.weight_keep_ratio)))
      masked_logits, _ = model.apply({'params': masked}, batch['image'], train=True,
                                     rngs={'dropout': dropout_rng})
      keep = typical_sample_weights(jax.lax.stop_gradient(_kl(logits, masked_logits)),
                                    cfg.sample_mask_ratio)
      aux['masked_fraction'] = 1 - keep.mean()
      return jnp.sum(ce * keep) / jnp.sum(keep), aux
    if cfg.loss == 'um':
      loss, flooded = flooding(ce.mean(), gamma, cfg.beta)
      aux['flooded'] = flooded.astype(jnp.float32)  # logged as the fraction of steps
      return loss, aux
    return ce.mean(), aux

  return loss_fn


def per_sample_ce(model, params, config, mesh) -> np.ndarray:
  """Eval-mode cross-entropy of every ID training example (no augmentation), against the
  stage's label-smoothed targets: gamma must be on the scale of the loss it constrains."""
  out = inference.extract(inference.make_forward(model, mesh), params, config, 'id_train', mesh)
  logits = jnp.asarray(out['logits'], jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(out['label'], logits.shape[-1]),
                                config.logit_ft.label_smoothing)
  return np.asarray(optax.softmax_cross_entropy(logits, targets))


def estimate_gamma(config, model, params, mesh) -> float:
  """The loss constraint from `logit_ft.gamma_from`; see the module docstring.

  UM's code averages per-batch means over the augmented train loader; here it is the
  exact mean over the un-augmented ID training set, so it does not depend on batching.
  """
  cfg = config.logit_ft
  if cfg.gamma_from == 'fixed':
    return float(cfg.gamma)
  if cfg.gamma_from == 'quantile':
    return float(np.quantile(per_sample_ce(model, params, config, mesh), cfg.gamma_quantile))
  key = jax.random.fold_in(jax.random.key(config.seed), 4)
  masked = jax.jit(lambda p: weight_mask.apply_masks(
      p, weight_mask.random_masks(key, p, cfg.weight_keep_ratio)))(params)
  return float(per_sample_ce(model, masked, config, mesh).mean())


def gamma_path(workdir: str) -> str:
  return os.path.join(workdir, f'{NAME}_gamma.json')


def _gamma(config, workdir, model, finetuned, mesh) -> float:
  """gamma of this run: read back on resume (it is fixed at the stage's start)."""
  path = gamma_path(workdir)
  if train_loop.final_step(workdir, NAME) is not None and os.path.exists(path):
    with open(path) as f:
      return json.load(f)['gamma']
  cfg = config.logit_ft
  gamma = estimate_gamma(config, model, finetuned(), mesh)
  record = {'gamma': gamma, 'gamma_from': cfg.gamma_from,
            'weight_keep_ratio': cfg.weight_keep_ratio, 'gamma_quantile': cfg.gamma_quantile}
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(record, f, indent=2)
    os.replace(path + '.tmp', path)
  metrics_log.write(workdir, NAME, 0, {'gamma': gamma})
  return gamma


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
  cfg = config.logit_ft
  model, init_params, tx, schedule = setup(config)
  _, finetune_init, finetune_tx, _ = finetune.setup(config)
  # The finetuned params are read at most once: the start point, gamma and the teacher.
  finetuned = functools.cache(lambda: train_loop.restore_params(
      workdir, finetune.NAME, finetune_init, finetune_tx, mesh, config.sharding_rules))

  gamma = None  # only flooding has a constraint
  if cfg.loss == 'um':
    gamma = _gamma(config, workdir, model, finetuned, mesh)
    logging.info('[%s] gamma %.4f (%s)', NAME, gamma, cfg.gamma_from)

  def initial_params():
    params = jax.jit(init_params)()
    params['model'] = finetuned()
    logging.info('[%s] starting from the finetune checkpoint', NAME)
    return params

  batch_fn = None
  if cfg.teacher_alpha < 1:
    teacher_forward = inference.make_forward(model, mesh)  # eval mode, as a teacher is
    teacher = finetuned()

    def batch_fn(batch):
      return {**batch, 'teacher_logits': teacher_forward(teacher, batch['image'])[1]}

  data = input_pipeline.train_dataset(config.data, global_batch_size=cfg.batch_size,
                                      seed=config.seed, augment=cfg.augment)
  train_loop.train(NAME, cfg, config, workdir, init_params=init_params,
                   loss_fn=make_loss_fn(model, cfg, gamma), tx=tx, lr_schedule=schedule,
                   data_iter=iter(data), mesh=mesh,
                   rng=jax.random.fold_in(jax.random.key(config.seed), 5),
                   initial_params=initial_params, batch_fn=batch_fn)


def trained_classifier(config, workdir: str, mesh):
  """(model, effective classifier params) of a finished run, for evaluation."""
  model, init_params, tx, _ = setup(config)
  params = train_loop.restore_params(workdir, NAME, init_params, tx, mesh,
                                     config.sharding_rules)
  return model, jax.jit(functools.partial(
      classifier_params, umap_keep_ratio=config.logit_ft.umap_keep_ratio))(params)

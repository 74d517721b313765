"""Stage 3: logit fine-tune under Unleashing Mask's loss constraint (UM, UMAP).

Starts from a finetune checkpoint (the last, or `init_step`: UM's CIFAR-100 runs start from
their best one, Unleashing-Mask configs/smallscale/densenet_cifar100.yaml `pretrained`) and
fine-tunes on ID data so that the model forgets the atypical samples it memorised late in
training (../shared/docs/um.md). Losses (`logit_ft.loss`):
- 'um' (the default: the paper's): flooding of the whole batch's mean CE,
  |beta * CE - gamma| + gamma (Unleashing-Mask utils/custom_loss.py `CustomLoss`); below
  gamma the step ascends CE. It is applied after gradient accumulation, so it is the same
  loss for any `grad_accum_steps`.
- 'sample_mask': our variant of a sample-masking loss from an early upload of UM's code
  (removed, and not runnable as uploaded; um.md). Per batch, the CE of the
  `sample_mask_ratio` samples with the largest KL(current model || a masked copy) is dropped
  and the rest averaged. Where that code differs: it compared the trained masked subnet with
  a fixed dense copy of the starting model, as KL(masked || full), kept the smallest-KL
  fraction and divided the kept CEs' sum by the batch size; ours masks the current weights
  with a fresh random mask each step, takes KL(full || masked) and divides by the kept count.
- 'ce': no constraint; the baseline, and what UM's public configs actually run (they set
  `criterion: CrossEntropyLoss`, which CustomLoss leaves unflooded).
Any of them can train against logits-based targets alpha * one_hot + (1 - alpha) *
softmax(teacher), the teacher being the starting finetuned model (`teacher_alpha` < 1).

For 'um', gamma is the mean CE of a masked copy of the starting model (`weight_keep_ratio`
of every kernel kept at random; UM's estimate_loss.py), a quantile of its per-sample
training CEs, or a fixed value. The CEs are the model's in eval mode over one pass of ID
train, read through the stage's own training transforms (`gamma_transforms='train'`, as
UM's estimate_loss.py reads its augmented `data.train_loader`) or the eval ones ('eval'),
against the stage's training targets (teacher-mixed ones included). gamma is written to
WORKDIR/logit_ft_gamma.json and reused on resume; at the end of the stage the log says on
what fraction of its steps the flood acted.

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

from mood_jax.ood import extraction
from mood_jax.train import (checkpoint, loop as train_loop, metrics_log, optim, periodic_eval,
                            stage as training_stage)
from mood_jax.data import catalogue
from mood_jax.errors import UserError
from mood_jax.models import vit, weight_mask
from mood_jax.stages import finetune

NAME = 'logit_ft'
RNG_STREAMS = {'umap_scores': 3, 'gamma_mask': 4, 'step': 5}  # training_stage.rng_stream
LOSSES = ('um', 'sample_mask', 'ce')
GAMMA_SOURCES = ('masked_model', 'quantile', 'fixed')
GAMMA_TRANSFORMS = ('train', 'eval')
UMAP_MODES = ('none', 'scores', 'both')
TRAINABLE = ('all', 'head', 'last_n_blocks')


def check_config(config: ml_collections.ConfigDict) -> None:
  """This stage's config errors, before anything runs."""
  cfg, depth = config.logit_ft, vit.parse_variant(config.model.variant)['depth']
  for field, valid in (('loss', LOSSES), ('gamma_from', GAMMA_SOURCES),
                       ('gamma_transforms', GAMMA_TRANSFORMS),
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
  finetune_cfg = config.finetune
  if cfg.init_step != -1 and not (
      1 <= cfg.init_step <= finetune_cfg.num_steps
      and (cfg.init_step % finetune_cfg.ckpt_every == 0
           or cfg.init_step == finetune_cfg.num_steps)):
    raise UserError(f'logit_ft.init_step={cfg.init_step} is not a step finetune saves: use -1 '
                    f'(its last, {finetune_cfg.num_steps}) or a multiple of '
                    f'finetune.ckpt_every={finetune_cfg.ckpt_every} up to finetune.num_steps')
  if cfg.trainable == 'last_n_blocks' and not 1 <= cfg.last_n_blocks <= depth:
    raise UserError(f'logit_ft.last_n_blocks={cfg.last_n_blocks} must be in [1, {depth}] '
                    f'(the model has {depth} blocks)')
  periodic_eval.check_config(config, NAME)
  finetune.check_labelled(config)


def adapts_layer(path: str, cfg: ml_collections.ConfigDict, depth: int) -> bool:
  """Whether the classifier param at '/'-joined `path` is in the part this stage adapts."""
  if cfg.trainable == 'all' or path.startswith('head/'):
    return True
  # 'last_n_blocks': the last n blocks, the final norm and the head (layer ids > depth - n).
  return cfg.trainable == 'last_n_blocks' and optim.layer_id(path, depth) > depth - cfg.last_n_blocks


def _init_and_tx(config: ml_collections.ConfigDict):
  """(model, init_params, optimizer); params are {'model'[, 'scores']}."""
  cfg = config.logit_ft
  model, classifier_init = finetune.classifier(config, cfg.drop_path)
  depth = model.encoder.depth

  def init_params():
    params = {'model': classifier_init()}
    if cfg.umap != 'none':
      params['scores'] = weight_mask.init_scores(
          training_stage.rng_stream(config.seed, RNG_STREAMS['umap_scores']), params['model'],
          lambda path: adapts_layer('/'.join(path), cfg, depth))
    return params

  def is_trainable(path: str) -> bool:
    part, _, rest = path.partition('/')
    if part == 'scores':  # scores exist only for the adapted kernels
      return True
    return cfg.umap != 'scores' and adapts_layer(rest, cfg, depth)

  # Layer decay leaves the scores at the stage's lr: UM's SGD param groups share one lr, the
  # scores' with the weights' (Unleashing-Mask utils/net_utils.py `get_optimizer`).
  tx = optim.make_optimizer(cfg, depth, layer_decay_exempt=lambda path: path.startswith('scores/'))
  return model, init_params, optim.train_only(tx, is_trainable)


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


def targets(cfg: ml_collections.ConfigDict, labels: jax.Array, num_classes: int,
            teacher_logits: jax.Array | None = None) -> jax.Array:
  """The stage's training targets: label-smoothed one-hot, mixed with the teacher's softmax
  when `teacher_alpha` < 1. The loss and gamma both use them: gamma floors that loss, so it
  must be on its scale."""
  one_hot = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), cfg.label_smoothing)
  if cfg.teacher_alpha == 1:
    return one_hot
  teacher = jax.nn.softmax(teacher_logits.astype(jnp.float32))
  return cfg.teacher_alpha * one_hot + (1 - cfg.teacher_alpha) * teacher


def _make_loss_fn(model, cfg: ml_collections.ConfigDict) -> training_stage.LossFn:
  def loss_fn(params, batch, rng):
    weights = classifier_params(params, cfg.umap_keep_ratio)
    dropout_rng, mask_rng = jax.random.split(rng)
    logits, _ = model.apply({'params': weights}, batch['image'], train=True,
                            rngs={'dropout': dropout_rng})
    ce = optax.softmax_cross_entropy(logits, targets(
        cfg, batch['label'], logits.shape[-1], batch.get('teacher_logits')))
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
    return ce.mean(), aux  # 'um' floods it in `make_batch_loss`, once the batch is whole

  return loss_fn


def make_batch_loss(cfg: ml_collections.ConfigDict, gamma: float | None):
  """For 'um', flooding of the whole batch's mean CE (train_loop.make_train_step applies it
  after accumulation); None for the other losses."""
  if cfg.loss != 'um':
    return None

  def batch_loss(mean_ce):
    loss, flooded = flooding(mean_ce, gamma, cfg.beta)
    return loss, {'flooded': flooded.astype(jnp.float32)}  # logged as the fraction of steps

  return batch_loss


def per_sample_ce(model, params, config, mesh, teacher=None) -> np.ndarray:
  """Eval-mode cross-entropy of every ID training example, read once through
  `gamma_transforms`, against the stage's training targets (`targets`); `teacher`: the
  teacher's params where they are not `params` (a masked copy's teacher is the unmasked
  model), read over the same images (the draws depend on the seed and the example only).
  In batches of the stage's own size (the result does not depend on it beyond rounding)."""
  cfg = config.logit_ft
  forward = extraction.make_forward(model, mesh)
  augment = cfg.augment if cfg.gamma_transforms == 'train' else False

  def logits_and_labels(p):
    out = extraction.extract(forward, p, config.data, 'id_train', mesh,
                             batch_size=cfg.batch_size, augment=augment, seed=config.seed)
    return jnp.asarray(out['logits'], jnp.float32), out['label']

  logits, labels = logits_and_labels(params)
  teacher_logits = None
  if cfg.teacher_alpha < 1:
    teacher_logits = logits if teacher is None else logits_and_labels(teacher)[0]
  return np.asarray(optax.softmax_cross_entropy(
      logits, targets(cfg, labels, logits.shape[-1], teacher_logits)))


def estimate_gamma(config, model, params, mesh) -> float:
  """The loss constraint from `logit_ft.gamma_from`; see the module docstring.

  The exact mean over one pass, as UM's: its estimate_loss.py averages batch means weighted
  by batch size (utils/logging.py `AverageMeter`) over `data.train_loader`, in eval mode
  (trainers/default.py `modifier`).
  """
  cfg = config.logit_ft
  if cfg.gamma_from == 'fixed':
    return float(cfg.gamma)
  if cfg.gamma_from == 'quantile':
    return float(np.quantile(per_sample_ce(model, params, config, mesh), cfg.gamma_quantile))
  key = training_stage.rng_stream(config.seed, RNG_STREAMS['gamma_mask'])
  masked = jax.jit(lambda p: weight_mask.apply_masks(
      p, weight_mask.random_masks(key, p, cfg.weight_keep_ratio)))(params)
  return float(per_sample_ce(model, masked, config, mesh, teacher=params).mean())


def gamma_path(workdir: str) -> str:
  return os.path.join(workdir, f'{NAME}_gamma.json')


def _gamma_source(gamma_from: str, gamma_transforms: str) -> str:
  if gamma_from == 'fixed':
    return gamma_from
  return f'{gamma_from} (ID train, {gamma_transforms} transforms)'


def _gamma(config, workdir, model, finetuned, mesh) -> float:
  """gamma of this run: read back on resume (it is fixed at the stage's start)."""
  path = gamma_path(workdir)
  if checkpoint.final_step(workdir, NAME) is not None and os.path.exists(path):
    with open(path) as f:
      return json.load(f)['gamma']
  cfg = config.logit_ft
  gamma = estimate_gamma(config, model, finetuned(), mesh)
  record = {'gamma': gamma, 'gamma_from': cfg.gamma_from,
            'gamma_transforms': cfg.gamma_transforms,
            'weight_keep_ratio': cfg.weight_keep_ratio, 'gamma_quantile': cfg.gamma_quantile,
            'finetune_step': cfg.init_step}
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(record, f, indent=2)
    os.replace(path + '.tmp', path)
  with metrics_log.Writer(workdir, NAME, first_step=0) as writer:
    writer.write(0, {'gamma': gamma})
  return gamma


def describe(config: ml_collections.ConfigDict,
             gamma: float | None = None) -> training_stage.TrainingStage:
  """`gamma`: UM's flooding level, which the run estimates at the stage's start
  (`estimate_gamma`); it is one constant in the step, so a description for the step's
  shapes and cost alone (dry run, benchmarks) may leave it out."""
  cfg = config.logit_ft
  model, init_params, tx = _init_and_tx(config)
  if cfg.loss == 'um' and gamma is None:
    gamma = 0.0  # a placeholder: see the docstring
  fields = ({'teacher_logits': (catalogue.source(config.data).num_classes(),)}
            if cfg.teacher_alpha < 1 else {})
  return training_stage.TrainingStage(
      name=NAME, cfg=cfg, model=model, init_params=init_params, tx=tx,
      lr_schedule=optim.make_schedule(cfg), loss_fn=_make_loss_fn(model, cfg),
      rng=training_stage.rng_stream(config.seed, RNG_STREAMS['step']), batch_fields=fields,
      batch_loss=make_batch_loss(cfg, gamma))


def run(config: ml_collections.ConfigDict, workdir: str, placement, later_images: int = 0) -> None:
  """Logit fine-tunes the finetuned classifier under `logit_ft.loss` (module docstring),
  resuming from WORKDIR/ckpt/logit_ft; `later_images` is for the run's ETA (train_loop.train)."""
  cfg = config.logit_ft
  finetune_model, finetune_init = finetune.classifier(config, drop_path=0.0)  # eval only
  # The finetuned params are read at most once: the start point, gamma and the teacher.
  start_step = None if cfg.init_step == -1 else cfg.init_step
  finetuned = functools.cache(lambda: checkpoint.restore_params(
      workdir, finetune.NAME, finetune_init, placement, step=start_step))

  gamma = None  # only flooding has a constraint
  if cfg.loss == 'um':
    gamma = _gamma(config, workdir, finetune_model, finetuned, placement.mesh)
    logging.info('[%s] gamma %.4f from %s', NAME, gamma,
                 _gamma_source(cfg.gamma_from, cfg.gamma_transforms))
  stage = describe(config, gamma)

  def start_params():
    params = jax.jit(stage.init_params)()
    params['model'] = finetuned()
    logging.info('[%s] starting from the finetune checkpoint of step %s', NAME,
                 'last' if start_step is None else start_step)
    return params

  batch_fn = None
  if stage.batch_fields:
    teacher_forward = extraction.make_forward(finetune_model, placement.mesh)
    teacher = finetuned()

    def batch_fn(batch):
      return {**batch, 'teacher_logits': teacher_forward(teacher, batch['image'])[1]}

  eval_fn = None
  if cfg.eval_every > 0:
    eval_fn = periodic_eval.make_eval_fn(config, NAME, stage.model, placement.mesh,
                                         _effective_params(cfg))
  train_loop.train(stage, config, workdir, placement, start_params=start_params,
                   batch_fn=batch_fn, eval_fn=eval_fn, later_images=later_images)
  if cfg.loss == 'um':
    _log_flooded_fraction(workdir, gamma)


def flooded_fraction(workdir: str) -> float | None:
  """The fraction of the stage's training steps that were flooded (batch CE below gamma: the
  step ascended CE), from metrics.jsonl, whose training rows each hold the mean over the
  steps since the stage's previous row; None where it has no such rows."""
  flooded_steps, previous = 0.0, 0
  for row in metrics_log.read(workdir):
    if row['stage'] == NAME and row.get('kind', 'train') == 'train':
      flooded_steps += row.get('flooded', 0.0) * (row['step'] - previous)
      previous = row['step']
  return flooded_steps / previous if previous else None


def _log_flooded_fraction(workdir: str, gamma: float) -> None:
  fraction = flooded_fraction(workdir)
  if fraction is None:  # metrics.jsonl is process 0's
    return
  if fraction == 0:
    logging.warning('[%s] no step was flooded: every batch CE stayed above gamma %.4f, so '
                    'loss=um trained as plain CE', NAME, gamma)
  else:
    logging.info('[%s] flooded on %.1f%% of the steps (batch CE below gamma %.4f: the step '
                 'ascended CE)', NAME, 100 * fraction, gamma)


def _effective_params(cfg: ml_collections.ConfigDict):
  """Jitted stage params -> the classifier's params (classifier_params)."""
  return jax.jit(functools.partial(classifier_params, umap_keep_ratio=cfg.umap_keep_ratio))


def trained_with(workdir: str) -> str:
  """One line on what the finished run trained with, from the config saved beside its final
  checkpoint (the evaluate stage's config may differ) and its gamma record."""
  with checkpoint.manager(checkpoint.checkpoint_dir(workdir, NAME)) as mngr:
    cfg = checkpoint.saved_config(mngr, checkpoint.final_step(workdir, NAME))[NAME]
  loss = {'um': "UM's flooding, |{beta} * CE - gamma| + gamma",
          'sample_mask': 'our sample_mask variant, {sample_mask_ratio} of each batch dropped',
          'ce': 'cross-entropy, no constraint'}[cfg['loss']].format(**cfg)
  parts = [f'loss={cfg["loss"]} ({loss})']
  if cfg['loss'] == 'um':
    with open(gamma_path(workdir)) as f:
      gamma = json.load(f)
    # Runs older than the field read ID train through the eval transforms.
    source = _gamma_source(gamma['gamma_from'], gamma.get('gamma_transforms', 'eval'))
    parts.append(f'gamma={gamma["gamma"]:.4f} from {source}')
    fraction = flooded_fraction(workdir)
    if fraction is not None:
      parts.append(f'flooded on {fraction:.0%} of steps')
    parts.append(f'weight_keep_ratio={cfg["weight_keep_ratio"]}')
  start = cfg.get('init_step', -1)  # absent from runs older than the field
  start = 'last' if start == -1 else start
  parts.append(f'from finetune step {start}, {cfg["num_steps"]} steps')
  if cfg['umap'] != 'none':
    parts.append(f'umap={cfg["umap"]} (keep {cfg["umap_keep_ratio"]})')
  if cfg['teacher_alpha'] < 1:
    parts.append(f'teacher_alpha={cfg["teacher_alpha"]}')
  return ', '.join(parts)


def trained_classifier(config, workdir: str, placement):
  """(model, effective classifier params) of a finished run, for evaluation."""
  model, init_params, _ = _init_and_tx(config)
  params = checkpoint.restore_params(workdir, NAME, init_params, placement)
  return model, _effective_params(config.logit_ft)(params)

"""Stage 2: supervised fine-tuning on the ID labels, from the pretrained encoder: our
pretrain stage's, or public weights converted by `python -m mood_jax.convert`."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from mood_jax.train import (checkpoint, loop as train_loop, optim, periodic_eval,
                            stage as training_stage)
from mood_jax.data import catalogue
from mood_jax.errors import UserError
from mood_jax.models import converted, vit
from mood_jax.stages import pretrain

NAME = 'finetune'
RNG_STREAMS = {'step': 2}  # training_stage.rng_stream


def classifier(config: ml_collections.ConfigDict, drop_path: float):
  """(ViT classifier, its param initialiser) for the ID classes; shared by later stages."""
  encoder = vit.encoder_from_config(config.model, drop_path=drop_path)
  data_source = catalogue.source(config.data)
  model = vit.Classifier(data_source.num_classes(), encoder, pool=config.model.pool)
  size, channels = config.data.image_size, data_source.channels

  def init_params():
    return model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, channels)))['params']

  return model, init_params


def check_labelled(config: ml_collections.ConfigDict) -> None:
  """A classifier needs two classes or more to train on (finetune, logit_ft)."""
  if catalogue.source(config.data).num_classes() < 2:
    raise UserError('one-class ID data has no labels to fine-tune on: drop finetune and '
                    'logit_ft from --config.stages and evaluate the pretrain encoder '
                    '(--config.evaluate.models=pretrain), as configs/digits.py:oneclass=C does, '
                    'or give the head every class of the dataset, as MOOD does '
                    '(--config.data.head_all_classes=True)')


def check_config(config: ml_collections.ConfigDict) -> None:
  """This stage's config errors, before anything runs (the converted weights' presence is
  checked last, by pipeline.validate)."""
  periodic_eval.check_config(config, NAME)
  check_labelled(config)


def params_from_pretrain(workdir: str, init_params, placement) -> dict:
  """Fresh classifier params with the pretrain checkpoint's encoder copied in (this stage's
  start, and the pretrain encoder's evaluation)."""
  pretrained = checkpoint.saved_params(workdir, pretrain.NAME, placement)
  return vit.merge_pretrained(placement.create(init_params), pretrained)


def converted_path(config) -> str:
  return os.path.abspath(os.path.expanduser(config.finetune.init_from))


def check_converted(config) -> None:
  """A missing converted checkpoint stops the run before any work, naming where the public
  weights are and the command that converts them for this config."""
  path, cfg = converted_path(config), config.finetune
  if converted.is_converted(path):
    return
  if not cfg.init_url:
    raise UserError(f'finetune.init_from={path} is not a directory written by `python -m '
                    'mood_jax.convert`: convert public weights (docs/public_weights.md), or use '
                    'pretrain or scratch')
  src = os.path.basename(cfg.init_url)
  flags = f' {cfg.init_convert_flags}' if cfg.init_convert_flags else ''
  raise UserError(f'no converted checkpoint at {path}: download {src} from {cfg.init_url} '
                  f'and convert it with `python -m mood_jax.convert --src {src} --variant '
                  f'{config.model.variant} --image_size {config.data.image_size}{flags} '
                  f'--out {path}`')


def params_from_converted(config, init_params, placement,
                          with_head: bool = False) -> tuple[dict, bool]:
  """(fresh classifier params with the converted checkpoint in finetune.init_from copied
  in, whether it had a head); its head too if `with_head` (a classifier scored as released)."""
  check_converted(config)
  return converted.load(converted_path(config), config.model, placement.create(init_params),
                        with_head=with_head)


def _make_loss_fn(model, cfg: ml_collections.ConfigDict) -> training_stage.LossFn:
  """Label-smoothed cross-entropy, with drop path (`cfg`: the stage's config block)."""
  def loss_fn(params, batch, rng):
    logits, _ = model.apply({'params': params}, batch['image'], train=True,
                            rngs={'dropout': rng})
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]),
                                  cfg.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}

  return loss_fn


def describe(config: ml_collections.ConfigDict) -> training_stage.TrainingStage:
  """The fine-tune step: the ViT classifier with drop path, the layer-decayed optimizer and
  label-smoothed cross-entropy (`config.finetune`)."""
  cfg = config.finetune
  model, init_params = classifier(config, cfg.drop_path)
  return training_stage.TrainingStage(
      name=NAME, cfg=cfg, model=model, init_params=init_params,
      tx=optim.make_optimizer(cfg, model.encoder.depth), lr_schedule=optim.make_schedule(cfg),
      loss_fn=_make_loss_fn(model, cfg),
      rng=training_stage.rng_stream(config.seed, RNG_STREAMS['step']))


def kept_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Steps kept beyond the latest `keep_checkpoints`: the logit fine-tune's start, when it
  is not the last (`logit_ft.init_step`)."""
  init_step = config.logit_ft.get('init_step', -1) if 'logit_ft' in config else -1
  return (init_step,) if init_step > 0 else ()


def run(config: ml_collections.ConfigDict, workdir: str, placement, later_images: int = 0) -> None:
  """Fine-tunes the classifier on the ID labels from `finetune.init_from` (the pretrain
  checkpoint, converted weights or scratch), resuming from WORKDIR/ckpt/finetune;
  `later_images` is for the run's ETA (train_loop.train)."""
  stage = describe(config)

  def start_params():
    if stage.cfg.init_from == 'pretrain':
      params = params_from_pretrain(workdir, stage.init_params, placement)
    else:
      params, _ = params_from_converted(config, stage.init_params, placement)
    logging.info('[%s] encoder initialised from the %s checkpoint', NAME, stage.cfg.init_from)
    return params

  eval_fn = (periodic_eval.make_eval_fn(config, NAME, stage.model, placement.mesh)
             if stage.cfg.eval_every > 0 else None)
  train_loop.train(stage, config, workdir, placement,
                   start_params=None if stage.cfg.init_from == 'scratch' else start_params,
                   keep_steps=kept_steps(config), eval_fn=eval_fn, later_images=later_images)

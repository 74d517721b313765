"""Stage 2: supervised fine-tuning on the ID labels, from the pretrained encoder: our
pretrain stage's, or public weights converted by `python -m mood_jax.convert`."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from mood_jax import convert, optim, parallel, train_eval, train_loop
from mood_jax.data import catalogue, input_pipeline
from mood_jax.errors import UserError
from mood_jax.models import vit
from mood_jax.stages import pretrain

NAME = 'finetune'


def classifier(config: ml_collections.ConfigDict, drop_path: float):
  """(ViT classifier, its param initialiser) for the ID classes; shared by later stages."""
  encoder = vit.encoder_from_config(config.model, drop_path=drop_path)
  model = vit.Classifier(catalogue.source(config.data).num_classes(), encoder,
                         pool=config.model.pool)
  size, channels = config.data.image_size, catalogue.source(config.data).channels

  def init_params():
    return model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, channels)))['params']

  return model, init_params


def setup(config: ml_collections.ConfigDict):
  """(model, init_params, optimizer, lr schedule) of this stage; shared with its consumers."""
  cfg = config.finetune
  model, init_params = classifier(config, cfg.drop_path)
  return (model, init_params, optim.make_optimizer(cfg, model.encoder.depth),
          optim.make_schedule(cfg))


def _resamplable(saved, fresh) -> bool:
  """Both learned position embeddings of square patch grids, of the same width."""
  return (vit.posemb_grid(saved) is not None and vit.posemb_grid(fresh) is not None
          and saved.shape[-1] == fresh.shape[-1])


def merge_pretrained(fresh: dict, pretrained: dict, source: str = 'pretrain',
                     with_head: bool = False) -> dict:
  """Fresh classifier params with every top-level module the pretrained model shares
  (encoder, and `norm` for CLS pooling) copied in; the head stays fresh unless `with_head`
  (a converted classifier scored as it is).

  A learned position embedding from another image size is resampled to this patch grid.
  Any other param that does not fit, and any shared one the model lacks, is a UserError
  listing them all. Pretraining-only params (the encoder's mask token) are left out.
  """
  shared = [name for name in fresh if (with_head or name != 'head') and name in pretrained]
  want = traverse_util.flatten_dict({name: fresh[name] for name in shared}, sep='/')
  saved = traverse_util.flatten_dict({name: pretrained[name] for name in shared}, sep='/')
  loaded = {}
  misfits = [f'{path}: not in the model' for path in saved
             if path not in want and not path.endswith('mask_token')]
  for path, value in want.items():
    if path not in saved:
      misfits.append(f'{path}: not in the checkpoint')
    elif saved[path].shape == value.shape:
      loaded[path] = saved[path]
    elif path.endswith('pos_embedding') and _resamplable(saved[path], value):
      old, new = vit.posemb_grid(saved[path]), vit.posemb_grid(value)
      loaded[path] = vit.resample_posemb(saved[path], new)
      logging.info('[%s] resampled %s from %dx%d to %dx%d patches', NAME, path, old, old,
                   new, new)
    else:
      misfits.append(f'{path}: model {value.shape}, checkpoint {saved[path].shape}')
  if misfits:
    raise UserError(f'the {source} checkpoint does not fit the model config: '
                    f'{"; ".join(misfits)}. Use the model options it was made with')
  return traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(fresh, sep='/'), **loaded}, sep='/')


def fresh_params(config, init_params, mesh) -> dict:
  """Freshly initialised params, created where they will live (split over 'fsdp' if so)."""
  shardings = parallel.state_shardings(jax.eval_shape(init_params), mesh, config.sharding_rules)
  return jax.jit(init_params, out_shardings=shardings)()


def params_from_pretrain(config, workdir: str, mesh, init_params) -> dict:
  """Fresh classifier params with the pretrain checkpoint's encoder copied in."""
  pretrained = train_loop.saved_params(workdir, pretrain.NAME, mesh, config.sharding_rules)
  return merge_pretrained(fresh_params(config, init_params, mesh), pretrained)


def _builds(model_cfg, converted: dict) -> bool:
  """Whether `config.model` builds the model a checkpoint was converted for. Either pooling
  fits, and any LayerScale init value (the checkpoint's gammas replace it)."""
  ours = {name: model_cfg.get(name) for name in converted}
  return all((ours[name] is None) == (value is None) if name == 'layer_scale' else
             ours[name] == value for name, value in converted.items() if name != 'pool')


def converted_path(config) -> str:
  return os.path.abspath(os.path.expanduser(config.finetune.init_from))


def check_converted(config) -> None:
  """A missing converted checkpoint stops the run before any work, naming where the public
  weights are and the command that converts them for this config."""
  path, cfg = converted_path(config), config.finetune
  if os.path.isfile(os.path.join(path, 'model.json')):
    return
  if not cfg.init_url:
    raise UserError(f'finetune.init_from={path} is not a directory written by `python -m '
                    'mood_jax.convert`: convert public weights (README "Starting from public '
                    'weights"), or use pretrain or scratch')
  src = os.path.basename(cfg.init_url)
  flags = f' {cfg.init_convert_flags}' if cfg.init_convert_flags else ''
  raise UserError(f'no converted checkpoint at {path}: download {src} from {cfg.init_url} '
                  f'and convert it with `python -m mood_jax.convert --src {src} --variant '
                  f'{config.model.variant} --image-size {config.data.image_size}{flags} '
                  f'--out {path}`')


def restore_converted(config) -> tuple[dict, str]:
  """(params, path) of the converted checkpoint (mood_jax.convert) in finetune.init_from;
  the model config must have the options it was converted for."""
  path = converted_path(config)
  check_converted(config)
  with open(os.path.join(path, 'model.json')) as f:
    converted = json.load(f)
  if not _builds(config.model, converted):
    raise UserError(f'{path} was converted for another model: run with '
                    f'{convert.config_flags(converted)}')
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(path, 'params'))['params'], path


def params_from_converted(config, init_params, mesh) -> dict:
  """Fresh classifier params with the converted checkpoint's encoder copied in."""
  pretrained, path = restore_converted(config)
  return merge_pretrained(fresh_params(config, init_params, mesh), pretrained, source=path)


def make_loss_fn(model, cfg: ml_collections.ConfigDict) -> train_loop.LossFn:
  """Label-smoothed cross-entropy, with drop path (`cfg`: the stage's config block)."""
  def loss_fn(params, batch, rng):
    logits, _ = model.apply({'params': params}, batch['image'], train=True,
                            rngs={'dropout': rng})
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]),
                                  cfg.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}

  return loss_fn


def kept_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Steps kept beyond the latest `keep_checkpoints`: the logit fine-tune's start, when it
  is not the last (`logit_ft.init_step`)."""
  init_step = config.logit_ft.get('init_step', -1) if 'logit_ft' in config else -1
  return (init_step,) if init_step > 0 else ()


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
  cfg = config.finetune
  model, init_params, tx, schedule = setup(config)

  def initial_params():
    if cfg.init_from == 'pretrain':
      params = params_from_pretrain(config, workdir, mesh, init_params)
    else:
      params = params_from_converted(config, init_params, mesh)
    logging.info('[%s] encoder initialised from the %s checkpoint', NAME, cfg.init_from)
    return params

  data = input_pipeline.train_dataset(config.data, global_batch_size=cfg.batch_size,
                                      seed=config.seed, augment=cfg.augment)
  train_loop.train(NAME, cfg, config, workdir, init_params=init_params,
                   loss_fn=make_loss_fn(model, cfg), tx=tx, lr_schedule=schedule,
                   data_iter=iter(data), mesh=mesh,
                   rng=jax.random.fold_in(jax.random.key(config.seed), 2),
                   initial_params=None if cfg.init_from == 'scratch' else initial_params,
                   keep_steps=kept_steps(config),
                   eval_fn=train_eval.make_eval_fn(config, NAME, model, mesh)
                   if cfg.eval_every > 0 else None, eval_every=cfg.eval_every)

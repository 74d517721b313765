"""Batched inference over a whole eval set: features, logits and labels, every example once."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mood_jax import parallel, watchdog
from mood_jax.data import input_pipeline
from mood_jax.models import vit


def forward_options(scorer, pixel_std) -> dict:
  """`make_forward`'s options for `scorer`: ODIN's input step, a layer scorer's own forward;
  none for the others."""
  if scorer.perturb is not None:
    return {'input_perturbation': functools.partial(scorer.perturb, pixel_std=pixel_std,
                                                    **scorer.hparams)}
  if scorer.forward is not None:
    return {'features_fn': functools.partial(scorer.forward, **scorer.hparams)}
  return {}


def make_forward(model, mesh, input_perturbation=None, features_fn=None):
  """Jitted (params, images) -> (features, logits), batch split over the batch axes.

  `input_perturbation(logits_fn, images) -> images` (ODIN's) moves the inputs first, with
  gradients of `logits_fn`, the model at `params`. Examples stay independent: eval mode has
  no cross-example op, so the gradient of a batch sum is each example's own.
  `features_fn(apply, images) -> (features, logits)` replaces the plain pass (a scorer's
  `forward`: named layers, edited passes); `apply(images, edit=None) -> (logits, named
  layers)`, the layers as `vit.named_layers`. Its features may be a dict of arrays.
  """
  def apply(params, images, edit=None):
    (logits, aux), state = model.apply({'params': params}, images, edit=edit,
                                       mutable=['intermediates'])
    return logits, vit.named_layers(aux, state['intermediates'])

  def features_and_logits(params, images):
    if input_perturbation is not None:
      images = input_perturbation(lambda x: model.apply({'params': params}, x)[0], images)
    if features_fn is not None:
      return features_fn(functools.partial(apply, params), images)
    logits, aux = model.apply({'params': params}, images)
    return aux['features'], logits

  # Params as they come: replicated, or split over 'fsdp' (see mood_jax.parallel).
  return jax.jit(features_and_logits,
                 in_shardings=(None, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def extract(forward, params, data_cfg, which: str, mesh, *, batch_size: int,
            augment: bool | str = False, seed: int = 0) -> dict:
  """Features, logits, labels and split indices of one data set (of `config.data`) as host
  numpy arrays, padding dropped, in global batches of `batch_size`; `augment` and `seed` as
  input_pipeline.eval_dataset's."""
  start = time.perf_counter()
  dataset, num_examples = input_pipeline.eval_dataset(
      data_cfg, which, global_batch_size=batch_size, augment=augment, seed=seed)
  parts = []
  for number, batch in enumerate(dataset):
    watchdog.beat(f'inference on {which}, batch {number}', compiling=number == 0)
    batch = parallel.global_batch(batch, mesh)
    features, logits = forward(params, batch['image'])
    parts.append({'features': features, 'logits': logits, 'label': batch['label'],
                  'index': batch['index'], 'valid': batch['valid']})
  # Gathered once: the scorers need the whole set (a bank or a query set) per host.
  gathered = multihost_utils.process_allgather(
      jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts), tiled=True)
  valid = np.asarray(gathered.pop('valid'))
  out = jax.tree.map(lambda v: np.asarray(v)[valid], gathered)
  if len(out['label']) != num_examples:  # padding must hide exactly the filler rows
    raise RuntimeError(f'{which}: extracted {len(out["label"])} examples, expected {num_examples}')
  logging.info('[inference] %s: %d examples in %.1fs', which, num_examples,
               time.perf_counter() - start)
  return out

"""Layer scorers: several named layers of the network (MDS ensemble, Gram, RankFeat)."""

import jax
import jax.numpy as jnp
import numpy as np

from mood_jax.ood.scorers.base import (
    CHUNK_SIZE, Scorer, _HIGHEST, _as_float32, _no_stats, _softmax, register)
from mood_jax.ood.scorers.gaussian import _class_distances, fit_mahalanobis


def _chosen_layers(spec: str, named: dict, default: tuple[str, ...]) -> list[str]:
  """'all' (the `default` names present) or comma-separated names of `named`, sorted."""
  chosen = ([name for name in named if name in default or any(
      name.startswith(prefix) for prefix in default if prefix.endswith('/'))]
            if spec.strip() == 'all' else [n.strip() for n in spec.split(',') if n.strip()])
  unknown = sorted(set(chosen) - set(named))
  if unknown or not chosen:
    raise ValueError(f'layers {spec!r}: {unknown or "none"} not among the model\'s named '
                     f'layers: {", ".join(sorted(named))}')
  return sorted(chosen)


def _spatial_mean(values):
  """OpenOOD's feature type 'mean' (each channel's mean over space): over tokens here."""
  return values.astype(jnp.float32).mean(axis=1) if values.ndim == 3 else values


def _layer_means(apply, images, *, layers):
  logits, named = apply(images)
  chosen = _chosen_layers(layers, named, ('encoder/', 'pre_logits'))
  return {f'layer{i:02d}': _spatial_mean(named[name]) for i, name in enumerate(chosen)}, logits


def fit_mds_ensemble(features, logits, labels, head, *, layers,
                     chunk_size: int = CHUNK_SIZE):
  """Lee et al.'s class Gaussians (tied covariance), one per chosen layer, as OpenOOD's
  mds_ensemble_postprocessor.py `get_MDS_stat` with feature type 'mean' and no dim
  reduction."""
  del layers
  return {key: fit_mahalanobis(values, logits, labels, head, chunk_size)
          for key, values in sorted(features.items())}


def _mds_ensemble(stats, features, logits, *, layers):
  """sum over layers of alpha_l max_c -d_c^2 / 2, alpha_l = 1 (OpenOOD's alpha_list given,
  not its logistic-regression search on OOD validation), inputs not perturbed (its noise)."""
  del logits, layers
  return sum(-0.5 * jnp.min(_class_distances(stats[key], values, _as_float32), axis=-1)
             for key, values in sorted(features.items()))


GRAM_POWERS = (1, 2, 3, 4, 5)  # OpenOOD's configs/postprocessors/gram.yml


def gram_features(values, powers):
  """[B, P, C] OpenOOD gram_postprocessor.py `G_p` of a layer [B, space, C] (ViT: tokens as
  space, width as channels), each power p: row sums of (x^p)^T (x^p), then signed p-th
  root. The row sum of the C x C Gram matrix, sum_j sum_t x_ti^p x_tj^p, is computed as
  sum_t x_ti^p (sum_j x_tj^p), without the matrix."""
  values = values.astype(jnp.float32)
  grams = []
  for p in powers:
    raised = values**p
    sums = jnp.einsum('btc,bt->bc', raised, jnp.sum(raised, axis=-1), precision=_HIGHEST)
    grams.append(jnp.sign(sums) * jnp.abs(sums)**(1. / p))
  return jnp.stack(grams, axis=1)


def _layer_grams(apply, images, *, layers, powers):
  logits, named = apply(images)
  chosen = _chosen_layers(layers, named, ('encoder/',))
  return {f'layer{i:02d}': gram_features(named[name], powers)
          for i, name in enumerate(chosen)}, logits


def _gram_deviation(mins, maxs, values):
  """OpenOOD's `delta`, per power: [B, P] relative excursions below the mins, above the
  maxs, summed over channels."""
  return (jnp.sum(jax.nn.relu(mins - values) / jnp.abs(mins + 1e-6), axis=-1)
          + jnp.sum(jax.nn.relu(values - maxs) / jnp.abs(maxs + 1e-6), axis=-1))


GRAM_VALIDATION_FRACTION = 0.1  # of each class, for the normalisers (OpenOOD's)


def fit_gram(features, logits, labels, head, *, layers, powers):
  """Per layer, power and class: the min and max of each Gram feature over the class's
  ID-train rows, less a random 10% of them on which each layer's mean deviation is
  measured, its normaliser (gram_postprocessor.py `sample_estimator`; its split is Python's
  unseeded `random.sample`, ours a seeded NumPy one). A class without rows keeps infinite
  bounds: no deviation."""
  del head, layers, powers
  labels, num_classes = np.asarray(labels), logits.shape[1]
  rng = np.random.default_rng(0)
  fit_rows, val_rows = [], []
  for c in range(num_classes):
    rows = np.flatnonzero(labels == c)
    held = np.zeros(len(rows), bool)
    held[rng.choice(len(rows), int(GRAM_VALIDATION_FRACTION * len(rows)), replace=False)] = True
    fit_rows.append(rows[~held])
    val_rows.append((c, rows[held]))
  stats = {}
  for key, values in sorted(features.items()):
    values = np.asarray(values, np.float32)
    mins = np.full((num_classes, *values.shape[1:]), -np.inf, np.float32)
    maxs = np.full_like(mins, np.inf)
    for c, rows in enumerate(fit_rows):
      if len(rows):
        mins[c], maxs[c] = values[rows].min(0), values[rows].max(0)
    deviations = [np.asarray(_gram_deviation(mins[c], maxs[c], values[rows])).sum(-1)
                  for c, rows in val_rows if len(rows)]
    stats[key] = {'mins': jnp.asarray(mins), 'maxs': jnp.asarray(maxs),
                  'normalizer': jnp.float32(np.concatenate(deviations).mean())}
  return stats


def _gram(stats, features, logits, *, layers, powers):
  """-(sum over layers of the predicted class's deviations / the layer's normaliser) /
  the max softmax (gram_postprocessor.py `get_deviations`)."""
  del layers, powers
  predicted = jnp.argmax(logits, axis=-1)
  total = sum(jnp.sum(_gram_deviation(stats[key]['mins'][predicted],
                                      stats[key]['maxs'][predicted], values), axis=-1)
              / stats[key]['normalizer'] for key, values in sorted(features.items()))
  return -total / jnp.max(_softmax(logits), axis=-1)


def remove_top_rank(tokens):
  """tokens [B, T, D] less each example's rank-1 part s_1 u_1 v_1^T (RankFeat's exact SVD)."""
  u, s, vt = jnp.linalg.svd(tokens.astype(jnp.float32), full_matrices=False)
  return (tokens - s[:, :1, None] * u[:, :, :1] * vt[:, :1, :]).astype(tokens.dtype)


def _rankfeat_forward(apply, images, *, temperature):
  """RankFeat (OpenOOD rankfeat_postprocessor.py): the logits of two passes, one with the
  last block's output less its rank-1 part and one with the second-to-last block's (its
  ResNet's blocks 4 and 3), averaged; no features (the score reads none)."""
  del temperature
  named = jax.eval_shape(apply, images)[1]
  depth = sum(name.startswith('encoder/block') for name in named)
  if depth < 2:
    raise ValueError(f'rankfeat edits the last two blocks; the model has {depth}')

  def edit_at(target):
    def edit(index, tokens):
      if isinstance(index, int):
        return remove_top_rank(tokens) if index == target else tokens
      return jax.lax.cond(index == target, remove_top_rank, lambda t: t, tokens)
    return edit

  logits = [apply(images, edit=edit_at(target))[0] for target in (depth - 1, depth - 2)]
  return None, (logits[0] + logits[1]) / 2


def _rankfeat(stats, features, logits, *, temperature):
  del stats, features
  return temperature * jax.nn.logsumexp(logits.astype(jnp.float32) / temperature, axis=-1)


register(Scorer('mds_ensemble', fit_mds_ensemble, _mds_ensemble, needs_logits=False,
                hparams={'layers': 'all'}, forward=_layer_means))

register(Scorer('gram', fit_gram, _gram, needs_logits=True,
                hparams={'layers': 'all', 'powers': GRAM_POWERS}, forward=_layer_grams))

register(Scorer('rankfeat', _no_stats, _rankfeat, needs_logits=True,
                hparams={'temperature': 1.0}, forward=_rankfeat_forward))

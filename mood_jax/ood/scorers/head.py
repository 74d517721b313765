"""Head scorers: the features reshaped or reweighted, then the classifier head (energy), or
compared with the head's weights (fDBD, NCI, SHE)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mood_jax.ood.scorers.base import (
    CHUNK_SIZE, Scorer, _HIGHEST, _as_float32, _energy_of, _group_means, _host_chunks,
    _top_k_values, register)


def _head_stats(head):
  return {'kernel': jnp.asarray(head['kernel'], jnp.float32),
          'bias': jnp.asarray(head['bias'], jnp.float32)}


def _head_energy(stats, features):
  logits = jnp.matmul(features, stats['kernel'], precision=_HIGHEST) + stats['bias']
  return _energy_of(logits)


def fit_react(features, logits, labels, head, *, percentile):
  """ReAct's clip: the percentile of all ID-train feature entries (NumPy's, linear)."""
  del logits, labels
  return {**_head_stats(head), 'clip': jnp.float32(np.percentile(features, percentile))}


def _react(stats, features, logits, *, percentile):
  del logits, percentile
  return _head_energy(stats, jnp.minimum(features.astype(jnp.float32), stats['clip']))


def fit_ash(features, logits, labels, head, *, variant, percentile):
  del features, logits, labels
  if variant not in ('p', 'b', 's'):
    raise ValueError(f"ash variant {variant!r}: use 'p' (prune), 'b' (binarize) or 's' (scale)")
  return _head_stats(head)


def _ash(stats, features, logits, *, variant, percentile):
  """Activation shaping (OpenOOD's ash_p/b/s) of each sample's features.

  Keeps each row's top n - round(n * percentile / 100) entries (exactly that many, ties
  broken as top_k does) and zeroes the rest; 'b' sets the kept ones to the row's original
  sum / count, 's' multiplies them by exp(original sum / kept sum).
  """
  del logits
  features = features.astype(jnp.float32)
  dim = features.shape[-1]
  num_kept = dim - int(np.round(dim * percentile / 100.))
  kept, index = jax.lax.top_k(features, num_kept)
  total = jnp.sum(features, axis=-1, keepdims=True)
  if variant == 'b':
    kept = jnp.broadcast_to(total / num_kept, kept.shape)
  elif variant == 's':
    kept = kept * jnp.exp(total / jnp.sum(kept, axis=-1, keepdims=True))
  shaped = jnp.put_along_axis(jnp.zeros_like(features), index, kept, axis=-1, inplace=False)
  return _head_energy(stats, shaped)


def fit_scale(features, logits, labels, head, *, percentile):
  del features, logits, labels, percentile
  return _head_stats(head)


def _scale(stats, features, logits, *, percentile):
  """SCALE (OpenOOD scale_postprocessor.py, networks/scale_net.py `scale`): every entry of
  the feature times exp(row sum / sum of the row's top n - round(n p / 100) entries), then
  the head's energy. Nothing is pruned: only the sum of the top entries is read."""
  del logits
  features = features.astype(jnp.float32)
  dim = features.shape[-1]
  kept = _top_k_values(features, dim - int(np.round(dim * percentile / 100.)))
  ratio = jnp.sum(features, axis=-1, keepdims=True) / jnp.sum(kept, axis=-1, keepdims=True)
  return _head_energy(stats, features * jnp.exp(ratio))


def fit_dice(features, logits, labels, head, *, p, chunk_size: int = CHUNK_SIZE):
  """DICE (OpenOOD dice_postprocessor.py): keeps the head's weights whose contribution
  mean ID-train feature x weight is above its p-th percentile (NumPy's, over all D x C)."""
  del logits, labels
  mean = _group_means(features, np.zeros(len(features), np.int32), 1, _as_float32,
                      chunk_size)[0]
  kernel = np.asarray(head['kernel'], np.float32)
  contribution = mean[:, None] * kernel
  kept = contribution > np.percentile(contribution, p)
  return {'kernel': jnp.asarray(kernel * kept), 'bias': jnp.asarray(head['bias'], jnp.float32)}


def _dice(stats, features, logits, *, p):
  del logits, p
  return _head_energy(stats, _as_float32(features))


_SHE_METRICS = ('inner_product', 'euclidean', 'cosine')


def fit_she(features, logits, labels, head, *, metric, chunk_size: int = CHUNK_SIZE):
  """SHE (OpenOOD she_postprocessor.py): per class, the mean feature of the ID-train samples
  of that label the classifier predicts right. A class with none keeps a zero pattern
  (OpenOOD's mean over none is NaN)."""
  del head
  if metric not in _SHE_METRICS:
    raise ValueError(f'she metric {metric!r}: use one of {", ".join(_SHE_METRICS)}')
  num_classes = logits.shape[1]
  correct = np.asarray(labels) == np.argmax(logits, axis=-1)
  # Wrong predictions go to an extra group, dropped after.
  group = np.where(correct, labels, num_classes)
  sums = np.zeros((num_classes + 1, features.shape[1]))
  for start, chunk in _host_chunks(features, _as_float32, chunk_size):
    np.add.at(sums, group[start:start + len(chunk)], chunk)
  counts = np.bincount(group, minlength=num_classes + 1)[:num_classes]
  patterns = sums[:num_classes] / np.maximum(counts, 1)[:, None]
  return {'patterns': jnp.asarray(patterns, jnp.float32)}


def _she(stats, features, logits, *, metric):
  features = _as_float32(features)
  pattern = stats['patterns'][jnp.argmax(logits, axis=-1)]
  if metric == 'inner_product':
    return jnp.sum(features * pattern, axis=-1)
  if metric == 'euclidean':
    return -jnp.linalg.norm(features - pattern, axis=-1)
  # torch.cosine_similarity: each norm floored at 1e-8.
  norms = (jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-8) for x in (features, pattern))
  return jnp.sum(features * pattern, axis=-1) / functools.reduce(jnp.multiply, norms)


def fit_feature_mean(features, logits, labels, head, chunk_size: int = CHUNK_SIZE, **hparams):
  """The ID-train mean feature (NCI's and fDBD's centre) and the head."""
  del logits, labels, hparams
  mean = _group_means(features, np.zeros(len(features), np.int32), 1, _as_float32,
                      chunk_size)[0]
  return {**_head_stats(head), 'mean': jnp.asarray(mean, jnp.float32)}


def fit_fdbd(features, logits, labels, head, *, distance_as_normalizer,
             chunk_size: int = CHUNK_SIZE):
  """The ID-train mean and fDBD's denominators ||w_c - w_p|| (classes p, c), in float64,
  the diagonal set to 1 as OpenOOD's."""
  del distance_as_normalizer
  stats = fit_feature_mean(features, logits, labels, head, chunk_size)
  columns = np.float64(head['kernel']).T  # [C, D]: each class's weight vector
  gaps = np.linalg.norm(columns[None] - columns[:, None], axis=-1)
  np.fill_diagonal(gaps, 1.)
  return {'mean': stats['mean'], 'gaps': jnp.asarray(gaps, jnp.float32)}


def _fdbd(stats, features, logits, *, distance_as_normalizer):
  """fDBD (OpenOOD fdbd_postprocessor.py): sum over classes c of |z_c - z_max| /
  ||w_c - w_max||, over ||f - ID-train mean|| (or ||f|| when not distance_as_normalizer)."""
  features, logits = _as_float32(features), logits.astype(jnp.float32)
  margins = jnp.abs(logits - jnp.max(logits, axis=-1, keepdims=True))
  total = jnp.sum(margins / stats['gaps'][jnp.argmax(logits, axis=-1)], axis=-1)
  centre = stats['mean'] if distance_as_normalizer else 0.
  return total / jnp.linalg.norm(features - centre, axis=-1)


def _nci(stats, features, logits, *, alpha):
  """NCI (OpenOOD nci_postprocessor.py): cosine-like alignment w_pred . (f - mean) /
  ||f - mean||, plus alpha ||f||_1."""
  features = _as_float32(features)
  centred = features - stats['mean']
  weights = stats['kernel'].T[jnp.argmax(logits, axis=-1)]
  alignment = jnp.sum(weights * centred, axis=-1) / jnp.linalg.norm(centred, axis=-1)
  return alignment + alpha * jnp.sum(jnp.abs(features), axis=-1)


register(Scorer('react', fit_react, _react, needs_logits=True, hparams={'percentile': 90}))

# One function, three names: each variant can be named in a config, and swept as an hparam.
for _variant in 'pbs':
  register(Scorer(f'ash_{_variant}', fit_ash, _ash, needs_logits=True,
                  hparams={'variant': _variant, 'percentile': 90}))

register(Scorer('scale', fit_scale, _scale, needs_logits=True, hparams={'percentile': 85}))

register(Scorer('dice', fit_dice, _dice, needs_logits=True, hparams={'p': 90}))

register(Scorer('she', fit_she, _she, needs_logits=True, hparams={'metric': 'inner_product'}))

register(Scorer('fdbd', fit_fdbd, _fdbd, needs_logits=True,
                hparams={'distance_as_normalizer': True}))

register(Scorer('nci', fit_feature_mean, _nci, needs_logits=True, hparams={'alpha': 1e-4}))

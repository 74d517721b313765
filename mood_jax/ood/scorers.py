"""A registry of OOD scorers; every score is "higher = more in-distribution".

A scorer is two pure functions: `fit(features, logits, labels, head) -> stats` on the ID
training set (`head` is the classifier's {'kernel': [D, C], 'bias': [C]}, or None when
there is no trained head) and `score(stats, features, logits) -> [N]`. Add your own from
your code, before the evaluate stage runs, and name it in `config.evaluate.scorers`:

  import jax.numpy as jnp
  from mood_jax.ood import scorers

  scorers.register(scorers.Scorer(
      name='feature_norm',
      fit=lambda features, logits, labels, head: {},
      score=lambda stats, features, logits: jnp.linalg.norm(features, axis=-1),
      needs_logits=False))
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Matmul precision for every statistic: TPUs default to bf16 passes, too coarse for a
# covariance and its pseudo-inverse.
_HIGHEST = jax.lax.Precision.HIGHEST
# Rows of the ID-train bank per covariance step: bounds memory at CHUNK_SIZE * D + D * D.
CHUNK_SIZE = 4096
ENERGY_TEMPERATURE = 1.0
PINV_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Scorer:
  name: str
  fit: Callable[..., Any]  # (features, logits, labels, head) -> stats pytree
  score: Callable[..., jax.Array]  # (stats, features, logits) -> [N]
  needs_logits: bool  # False: usable without a classifier head (e.g. one-class mode)


_REGISTRY: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
  """Adds `scorer` under its name, with `score` jitted; returns the stored scorer."""
  if scorer.name in _REGISTRY:
    # A silent replacement would change what an existing config name means.
    raise ValueError(f'scorer {scorer.name!r} is already registered')
  _REGISTRY[scorer.name] = dataclasses.replace(scorer, score=jax.jit(scorer.score))
  return _REGISTRY[scorer.name]


def get(name: str) -> Scorer:
  if name not in _REGISTRY:
    raise KeyError(f'unknown scorer {name!r}; registered scorers: {", ".join(names())}')
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def _no_stats(features, logits, labels, head):
  """Logit scorers need nothing from the training set."""
  del features, logits, labels, head
  return {}


def _msp(stats, features, logits):
  del stats, features
  return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def _maxlogit(stats, features, logits):
  del stats, features
  return jnp.max(logits.astype(jnp.float32), axis=-1)


def _energy(stats, features, logits):
  del stats, features
  scaled = logits.astype(jnp.float32) / ENERGY_TEMPERATURE
  return ENERGY_TEMPERATURE * jax.nn.logsumexp(scaled, axis=-1)


def _l2_normalize(features):
  features = jnp.asarray(features, jnp.float32)
  norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
  return features / jnp.maximum(norms, 1e-12)  # all-zero rows stay zero, not NaN


def _centered_rows(chunk, num_valid, mean):
  """L2-normalised rows minus `mean`, padding rows (index >= num_valid) zeroed."""
  rows = _l2_normalize(chunk) - mean
  return jnp.where(jnp.arange(chunk.shape[0])[:, None] < num_valid, rows, 0.)


@jax.jit
def _add_row_sum(total, chunk, num_valid):
  return total + jnp.sum(_centered_rows(chunk, num_valid, 0.), axis=0)


@jax.jit
def _add_scatter(total, chunk, num_valid, mean):
  rows = _centered_rows(chunk, num_valid, mean)
  return total + jnp.matmul(rows.T, rows, precision=_HIGHEST)


def _fold_chunks(step, total, features, chunk_size, *args):
  """Folds `step` over fixed-shape row chunks (the last one zero-padded).

  One static shape means one compilation, and the host bank moves to the device one
  chunk at a time.
  """
  num_rows = features.shape[0]
  for start in range(0, num_rows, chunk_size):
    chunk = np.asarray(features[start:start + chunk_size], np.float32)
    padded = np.pad(chunk, ((0, chunk_size - len(chunk)), (0, 0)))
    total = step(total, padded, len(chunk), *args)
  return total


def fit_mahalanobis_mood(features, logits, labels, head, chunk_size: int = CHUNK_SIZE):
  """MOOD's single Gaussian on L2-normalised ID-train features (biased covariance)."""
  del logits, labels, head
  num_rows, dim = features.shape
  mean = _fold_chunks(_add_row_sum, jnp.zeros(dim), features, chunk_size) / num_rows
  # Centred second pass: E[ff^T] - mu mu^T would cancel catastrophically in float32.
  covariance = _fold_chunks(_add_scatter, jnp.zeros((dim, dim)), features, chunk_size,
                            mean) / num_rows
  # Pseudo-inverse: the covariance is singular when the bank has fewer rows than dims (and
  # LayerNorm'd features always lose one direction). float32 resolves eigenvalues down to
  # ~eps * max, so a 1e-6 relative cutoff keeps every direction it can see. JAX's default
  # (10 * D * eps) dropped real low-variance ID directions: on digits it cost 1 point of
  # noise AUROC against MOOD's float64 np.linalg.pinv, which this cutoff matches.
  return {'mean': mean,
          'precision': jnp.linalg.pinv(covariance, rtol=PINV_RTOL, hermitian=True)}


def _mahalanobis_mood(stats, features, logits):
  del logits
  centered = _l2_normalize(features) - stats['mean']
  projected = jnp.matmul(centered, stats['precision'], precision=_HIGHEST)
  return -jnp.sum(projected * centered, axis=-1)


register(Scorer('msp', _no_stats, _msp, needs_logits=True))
register(Scorer('maxlogit', _no_stats, _maxlogit, needs_logits=True))
register(Scorer('energy', _no_stats, _energy, needs_logits=True))
register(Scorer('mahalanobis_mood', fit_mahalanobis_mood, _mahalanobis_mood,
                needs_logits=False))

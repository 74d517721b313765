"""Principal-space scorers: ViM and its residual."""

import jax
import jax.numpy as jnp
import numpy as np

from mood_jax.ood.scorers.base import (
    CHUNK_SIZE, Scorer, _HIGHEST, _as_float32, _energy_of, _fold_rows, _valid_rows, register)
from mood_jax.ood.scorers.gaussian import Moments


def principal_dim(feature_dim: int) -> int:
  """ViM's principal-space size D: 1000 from 2048-d, 512 from 768-d, else half the dims.

  The rule of the ViM paper's code, as MOODv2 uses it; half keeps a residual for small
  test models.
  """
  return 1000 if feature_dim >= 2048 else 512 if feature_dim >= 768 else feature_dim // 2


def _fit_null_space(features, head, dim, chunk_size):
  """Origin u = -pinv(W) b (the logits' zero) and the eigenvectors beyond the top `dim` of
  the ID-train second moment about u (OpenOOD's EmpiricalCovariance(assume_centered))."""
  feature_dim = features.shape[1]
  dim = principal_dim(feature_dim) if dim is None else dim
  if not 0 < dim < feature_dim:
    raise ValueError(f'principal dim {dim}: needs 0 < dim < {feature_dim} (the feature dim)')
  # In float64 with NumPy's default cutoff, as OpenOOD's vim_postprocessor.py.
  origin = -np.linalg.pinv(np.float64(head['kernel']).T) @ np.float64(head['bias'])
  moment = Moments.of(features, None, _as_float32, chunk_size).second_moment_about(origin)
  _, eigenvectors = np.linalg.eigh(moment)  # ascending eigenvalues
  return {'origin': jnp.asarray(origin, jnp.float32),
          'null_space': jnp.asarray(eigenvectors[:, :feature_dim - dim], jnp.float32)}


def _residual_norm(stats, features):
  centered = _as_float32(features) - stats['origin']
  return jnp.linalg.norm(jnp.matmul(centered, stats['null_space'], precision=_HIGHEST),
                         axis=-1)


@jax.jit
def _add_residual_norms(total, rows, num_valid, stats):
  norms = jnp.where(_valid_rows(rows, num_valid), _residual_norm(stats, rows), 0.)
  return total + jnp.sum(norms)


def fit_residual(features, logits, labels, head, *, dim, chunk_size: int = CHUNK_SIZE):
  del logits, labels
  return _fit_null_space(features, head, dim, chunk_size)


def _residual(stats, features, logits, *, dim):
  del logits, dim
  return -_residual_norm(stats, features)


def fit_vim(features, logits, labels, head, *, dim, chunk_size: int = CHUNK_SIZE):
  """The residual's space, and alpha = mean max logit / mean residual norm on ID train."""
  stats = fit_residual(features, logits, labels, head, dim=dim, chunk_size=chunk_size)
  norm_sum = _fold_rows(_add_residual_norms, np.float32(0), (features,), chunk_size, stats)
  mean_max_logit = np.mean(np.max(logits, axis=-1), dtype=np.float64)
  return {**stats, 'alpha': jnp.float32(mean_max_logit * len(features) / norm_sum)}


def _vim(stats, features, logits, *, dim):
  del dim
  return _energy_of(logits) - stats['alpha'] * _residual_norm(stats, features)


register(Scorer('vim', fit_vim, _vim, needs_logits=True, hparams={'dim': None}))

register(Scorer('residual', fit_residual, _residual, needs_logits=True, hparams={'dim': None}))

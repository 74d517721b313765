"""Gaussian scorers: class-conditional and single Mahalanobis distances, RMDS and the tied
GMM, from one-pass float64 `Moments`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mood_jax.ood.scorers.base import (
    CHUNK_SIZE, Scorer, _HIGHEST, _as_float32, _host_chunks, _l2_normalize, register)


@dataclasses.dataclass(frozen=True)
class Moments:
  """Rows per group, their float64 means and the pooled within-group scatter
  sum_rows (x - mean_group)(x - mean_group)^T, accumulated one chunk at a time (Chan, Golub
  and LeVeque's pairwise update, each chunk centred on its own means: no E[xx^T] - mu mu^T
  cancellation). The host holds one float64 chunk, never N x D, and `add` continues the fit
  with more rows: `Moments.of(part1, labels1).add(part2, labels2)` is `Moments.of` of both.
  Groups are integer labels 0 .. G - 1; groups without rows have count 0.
  """
  counts: np.ndarray  # [G]
  means: np.ndarray  # [G, D]
  scatter: np.ndarray  # [D, D]

  @classmethod
  def of(cls, rows, groups=None, prepare=_as_float32, chunk_size: int = CHUNK_SIZE):
    """The moments of `prepare(rows)` (None `groups`: one group)."""
    dim = jax.eval_shape(prepare, jax.ShapeDtypeStruct((1, rows.shape[1]), rows.dtype)).shape[-1]
    empty = cls(np.zeros(0, np.int64), np.zeros((0, dim)), np.zeros((dim, dim)))
    return empty.add(rows, groups, prepare, chunk_size)

  def add(self, rows, groups=None, prepare=_as_float32, chunk_size: int = CHUNK_SIZE):
    moments = self
    for start, chunk in _host_chunks(rows, prepare, chunk_size):
      group = (np.zeros(len(chunk), np.int64) if groups is None
               else np.asarray(groups[start:start + len(chunk)], np.int64))
      moments = moments._merged(chunk, group)
    return moments

  def _merged(self, chunk, group):
    num_groups = max(len(self.counts), int(group.max()) + 1)
    counts = np.bincount(group, minlength=num_groups)
    sums = np.zeros((num_groups, chunk.shape[1]))
    np.add.at(sums, group, chunk)
    chunk_means = sums / np.maximum(counts, 1)[:, None]
    deviations = chunk - chunk_means[group]
    old_counts = np.pad(self.counts, (0, num_groups - len(self.counts)))
    old_means = np.pad(self.means, ((0, num_groups - len(self.means)), (0, 0)))
    total = old_counts + counts
    delta = chunk_means - old_means
    # Each group's shift between its old and new means adds n_a n_b / n delta delta^T.
    weights = old_counts * counts / np.maximum(total, 1)
    scatter = self.scatter + deviations.T @ deviations + (delta * weights[:, None]).T @ delta
    means = old_means + delta * (counts / np.maximum(total, 1))[:, None]
    return Moments(total, means, scatter)

  @property
  def num_rows(self) -> int:
    return int(self.counts.sum())

  def pooled(self) -> 'Moments':
    """All groups as one: the overall mean, the scatter plus the between-group part."""
    mean = self.counts @ self.means / self.num_rows
    offsets = self.means - mean
    between = (offsets * self.counts[:, None]).T @ offsets
    return Moments(np.array([self.num_rows]), mean[None], self.scatter + between)

  def second_moment_about(self, point) -> np.ndarray:
    """float64 biased second moment about `point` of one group's (`pooled()`) rows."""
    offset = self.means[0] - np.asarray(point, np.float64)
    return self.scatter / self.num_rows + np.outer(offset, offset)


# np.linalg.pinv's default rcond, which MOOD's ood_utils.py `mahalanobis` inverts at: singular
# values above 1e-15 of the largest are kept. OpenOOD's MDS (sklearn EmpiricalCovariance's
# precision_, i.e. scipy.linalg.pinvh) keeps eigenvalues above D x float64 eps of the largest,
# 230x higher at D=1024: a direction in between is inverted by MOOD and ignored by OpenOOD.
PINV_RCOND = 1e-15


def _whitening(covariance: np.ndarray, rcond: float | None = None) -> np.ndarray:
  """W [D, K] with W W^T the float64 pseudo-inverse of `covariance`, keeping the eigenvalues
  above `rcond` of the largest (default: pinvh's D x eps): no NaN on a rank-deficient bank.
  An eigenvalue that rounding leaves negative is dropped (np.linalg.pinv would invert it).

  Scoring then computes ||W^T d||^2, not d^T P d: in float32, P's entries of 1 / (a tiny
  kept eigenvalue) swamp the product with rounding error (on digits, the one direction that
  LayerNorm leaves with ~3e-12 of the largest variance took MOOD's AUROC from 98.5 to 60.4),
  while W's rows scale only by its square root and each projection is of a unit vector.
  """
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  if rcond is None:
    rcond = len(covariance) * np.finfo(np.float64).eps
  kept = eigenvalues > rcond * eigenvalues.max()
  return eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])


def gaussian_stats(moments: Moments, rcond: float | None = None) -> dict:
  """Class means and their shared (tied, within-class) precision, as OpenOOD's MDS, the
  precision as its whitening (`_whitening`, at `rcond`): the stats of mahalanobis (and, of
  moments of normalised rows, mahalanobis_mood), from `Moments` that may have been added to.

  Only the groups with rows get a mean. Means are kept relative to the overall mean
  (`center`): scoring expands the squared distances around it, where the terms are of the
  distances' own size.
  """
  present = moments.counts > 0
  means = moments.means[present]
  center = moments.pooled().means[0]
  whitening = _whitening(moments.scatter / moments.num_rows, rcond)
  offsets = (means - center) @ whitening  # whitened
  stats = {'center': center, 'whitening': whitening, 'class_offsets': offsets,
           'class_norms': np.sum(offsets * offsets, axis=-1)}
  return {name: jnp.asarray(value, jnp.float32) for name, value in stats.items()}


def _whitened(features, center, whitening, prepare):
  return jnp.matmul(prepare(features) - center, whitening, precision=_HIGHEST)


def _class_distances(stats, features, prepare):
  """[N, classes] squared Mahalanobis distances, expanded around `center`."""
  whitened = _whitened(features, stats['center'], stats['whitening'], prepare)
  to_means = jnp.matmul(whitened, stats['class_offsets'].T, precision=_HIGHEST)
  return (jnp.sum(whitened * whitened, axis=-1, keepdims=True) - 2. * to_means
          + stats['class_norms'])


def fit_mahalanobis_mood(features, logits, labels, head, chunk_size: int = CHUNK_SIZE):
  """MOOD's single Gaussian on L2-normalised ID-train features (biased covariance), inverted
  at np.linalg.pinv's cutoff as MOOD's ood_utils.py `mahalanobis` does."""
  del logits, labels, head
  return gaussian_stats(Moments.of(features, None, _l2_normalize, chunk_size), PINV_RCOND)


def _mahalanobis_mood(stats, features, logits):
  del logits
  return -_class_distances(stats, features, _l2_normalize)[:, 0]


def fit_mahalanobis(features, logits, labels, head, chunk_size: int = CHUNK_SIZE):
  """Lee et al.'s class-conditional Gaussians, features as they are (as OpenOOD's MDS).

  Only the classes present in `labels` get a mean (one-class runs: one Gaussian).
  """
  del logits, head
  return gaussian_stats(_class_moments(features, labels, chunk_size))


def _class_moments(features, labels, chunk_size):
  """Moments per class; labels as they are, or their ranks if any is negative."""
  labels = np.asarray(labels)
  if labels.min() < 0:
    labels = np.unique(labels, return_inverse=True)[1]
  return Moments.of(features, labels, _as_float32, chunk_size)


def _mahalanobis(stats, features, logits):
  del logits
  return -jnp.min(_class_distances(stats, features, _as_float32), axis=-1)


def fit_rmds(features, logits, labels, head, chunk_size: int = CHUNK_SIZE):
  """Class Gaussians plus one background Gaussian of all features (Ren et al.)."""
  del logits, head
  moments = _class_moments(features, labels, chunk_size)
  pooled = moments.pooled()
  background = _whitening(pooled.scatter / pooled.num_rows)
  return {**gaussian_stats(moments), 'background_whitening': jnp.asarray(background,
                                                                         jnp.float32)}


def _rmds(stats, features, logits):
  """Background distance minus the nearest class distance: 0 for a single class."""
  del logits
  whitened = _whitened(features, stats['center'], stats['background_whitening'], _as_float32)
  background = jnp.sum(whitened * whitened, axis=-1)
  return background - jnp.min(_class_distances(stats, features, _as_float32), axis=-1)


GMM_DIM = 50  # OpenOOD's configs/postprocessors/gmm.yml: pca_50


def fit_gmm(features, logits, labels, head, *, num_clusters, dim,
            chunk_size: int = CHUNK_SIZE):
  """OpenOOD's gmm_postprocessor.py on the pooled features: project on the top `dim`
  principal axes (None: 50, its 'pca_50', or D if smaller; sklearn PCA's components,
  applied to uncentred features),
  then sklearn's GaussianMixture(covariance_type='tied', random_state=0). The mixture is
  fitted on the N x dim projection (host float64, dim << D); the axes come from the
  chunked float64 covariance."""
  del logits, labels, head
  from sklearn import mixture  # noqa: PLC0415 (host only, at fit time)
  feature_dim = features.shape[1]
  dim = min(GMM_DIM, feature_dim) if dim is None else dim
  if not 0 < dim <= feature_dim:
    raise ValueError(f'gmm dim {dim}: needs 0 < dim <= {feature_dim} (the feature dim)')
  if len(features) < num_clusters:
    raise ValueError(f'gmm: num_clusters={num_clusters} but the bank has {len(features)} rows')
  moments = Moments.of(features, None, _as_float32, chunk_size)
  _, eigenvectors = np.linalg.eigh(moments.scatter / moments.num_rows)
  axes = eigenvectors[:, ::-1][:, :dim]  # descending variance, as PCA's components
  projected = np.concatenate([chunk @ axes for _, chunk in
                              _host_chunks(features, _as_float32, chunk_size)])
  gmm = mixture.GaussianMixture(n_components=num_clusters, covariance_type='tied',
                                random_state=0).fit(projected)
  # The tied precision as its whitening (see `_whitening`); means relative to their centre.
  whitening = _whitening(gmm.covariances_)
  center = gmm.means_.mean(axis=0)
  offsets = (gmm.means_ - center) @ whitening
  stats = {'axes': axes, 'center': center, 'whitening': whitening, 'class_offsets': offsets,
           'class_norms': np.sum(offsets * offsets, axis=-1), 'log_weights': np.log(gmm.weights_)}
  return {name: jnp.asarray(value, jnp.float32) for name, value in stats.items()}


def _gmm(stats, features, logits, *, num_clusters, dim):
  """log sum_k w_k exp(-d_k^2 / 2), d_k the Mahalanobis distance to component k, as a
  logsumexp: OpenOOD's log(sum + 1e-45) in float32 saturates at -103.6 for every far input."""
  del logits, num_clusters, dim
  projected = jnp.matmul(_as_float32(features), stats['axes'], precision=_HIGHEST)
  distances = _class_distances(stats, projected, _as_float32)
  return jax.nn.logsumexp(stats['log_weights'] - 0.5 * distances, axis=-1)


register(Scorer('mahalanobis_mood', fit_mahalanobis_mood, _mahalanobis_mood,
                needs_logits=False))

register(Scorer('mahalanobis', fit_mahalanobis, _mahalanobis, needs_logits=False))

register(Scorer('rmds', fit_rmds, _rmds, needs_logits=False))

register(Scorer('gmm', fit_gmm, _gmm, needs_logits=False,
                hparams={'num_clusters': 50, 'dim': None}))

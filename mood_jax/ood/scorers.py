"""A registry of OOD scorers; every score is "higher = more in-distribution".

A scorer is two pure functions: `fit(features, logits, labels, head, **hparams) -> stats` on
the ID training set and `score(stats, features, logits, **hparams) -> [N]`. `features` [N, D]
are the pooled pre-head features (so logits == features @ kernel + bias), `logits` [N, C]
(None where a scorer needs none), `labels` [N] int and `head` the classifier's
{'kernel': [D, C], 'bias': [C]}, or None when there is no trained head. The evaluate stage
gathers each set once, to the host, so `fit` and `score` receive host NumPy arrays; banks
then stream to the device in fixed-shape chunks.

Call them through the module-level `fit` and `score`: they pass the scorer's `hparams`,
score in fixed-shape chunks (one compilation, bounded memory) and, given a mesh, split the
large banks (knn's ID-train bank, residual's norms) over its batch axes, so that no device
holds a whole bank. Means and covariances are accumulated in float64 on the host instead,
as the references do (`_host_chunks`).

Hyperparameters are keyword arguments with their defaults in `Scorer.hparams`;
`scorer.with_hparams(k=10)` is the same scorer with other values (`score` is jitted with
them static). Add your own from your code, before the evaluate stage runs, and name it in
`config.evaluate.scorers` (or use 'all'):

  import jax.numpy as jnp
  from mood_jax.ood import scorers

  scorers.register(scorers.Scorer(
      name='feature_norm',
      fit=lambda features, logits, labels, head: {},
      score=lambda stats, features, logits: jnp.linalg.norm(features, axis=-1),
      needs_logits=False))

Semantics follow OpenOOD v1.5's postprocessors; where ours differ, the scorer says so.
"""

import contextlib
import dataclasses
import functools
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mood_jax import parallel

# Matmul precision for every statistic and distance: TPUs default to bf16 passes, too
# coarse for a covariance, its pseudo-inverse or a k-th neighbour. On CPU it is free (f32
# is the default there), and the matmuls are a small part of the work on accelerators.
_HIGHEST = jax.lax.Precision.HIGHEST
# Rows of the ID-train bank per fit step: bounds memory at CHUNK_SIZE * D + D * D.
CHUNK_SIZE = 4096
# Query rows per score step; knn holds QUERY_CHUNK x (bank rows / devices) similarities.
QUERY_CHUNK = 512
# Bank rows per similarity block of a bank scorer (knn, nnguide, relation): a query chunk
# holds QUERY_CHUNK x BANK_BLOCK float32 similarities (128 MiB), whatever the bank's size.
BANK_BLOCK = 65536
ENERGY_TEMPERATURE = 1.0


@dataclasses.dataclass(frozen=True)
class Scorer:
  name: str
  fit: Callable[..., Any]  # (features, logits, labels, head, **hparams) -> stats pytree
  score: Callable[..., jax.Array]  # (stats, features, logits, **hparams) -> [N] float32
  needs_logits: bool  # False: usable without a trained classifier head (one-class mode)
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # defaults
  # ODIN only: (logits_fn, images, pixel_std, **hparams) -> perturbed images; the evaluate
  # stage scores the logits of those.
  perturb: Callable[..., jax.Array] | None = None
  # Layer scorers: (apply, images, **hparams) -> (features, logits) inside the jitted
  # forward pass, in place of the plain one; apply(images, edit=None) -> (logits, named
  # layers: vit.named_layers). Its features (e.g. {layer: [N, F]}) reach fit and score.
  forward: Callable[..., Any] | None = None
  # The reference fits it on ID validation, not ID train (temperature scaling: a fit on
  # the images the classifier memorised would find T < 1); the evaluate stage follows.
  fits_on_id_validation: bool = False

  def __post_init__(self):
    # Lists (a JSON round trip's tuples: detector.json) as tuples: `score` is jitted with
    # the hparams static, so they must hash.
    hparams = {name: tuple(value) if isinstance(value, list) else value
               for name, value in self.hparams.items()}
    object.__setattr__(self, 'hparams', types.MappingProxyType(hparams))

  def with_hparams(self, **overrides) -> 'Scorer':
    unknown = sorted(set(overrides) - set(self.hparams))
    if unknown:
      raise ValueError(f'scorer {self.name!r} has no hparams {unknown}; its hparams: '
                       f'{sorted(self.hparams) or "none"}')
    return dataclasses.replace(self, hparams={**self.hparams, **overrides})


_REGISTRY: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
  """Adds `scorer` under its name, with `score` jitted; returns the stored scorer."""
  if scorer.name in _REGISTRY:
    # A silent replacement would change what an existing config name means.
    raise ValueError(f'scorer {scorer.name!r} is already registered')
  score = jax.jit(scorer.score, static_argnames=tuple(scorer.hparams))
  _REGISTRY[scorer.name] = dataclasses.replace(scorer, score=score)
  return _REGISTRY[scorer.name]


def get(name: str) -> Scorer:
  if name not in _REGISTRY:
    raise KeyError(f'unknown scorer {name!r}; registered scorers: {", ".join(names())}')
  return _REGISTRY[name]


def configured(scorer: Scorer, hparams) -> Scorer:
  """`scorer` with the values `hparams` (a config's evaluate.hparams) sets for it."""
  overrides = hparams.get(scorer.name)
  return scorer.with_hparams(**overrides.to_dict()) if overrides else scorer


def needs_train_stats(scorer: Scorer) -> bool:
  """Whether `fit` reads the ID training set (else it ignores its inputs: msp, energy, ...)."""
  return scorer.fit is not _no_stats


def names() -> list[str]:
  return sorted(_REGISTRY)


def resolve(spec: str) -> list[Scorer]:
  """'all', or comma-separated names (blanks ignored), as registered scorers."""
  if spec.strip() == 'all':
    return [get(name) for name in names()]
  wanted = [name.strip() for name in spec.split(',') if name.strip()]
  if not wanted:
    raise ValueError(f'no scorer named in {spec!r}; registered scorers: {", ".join(names())}')
  return [get(name) for name in dict.fromkeys(wanted)]


# --- Entry points: hparams, chunks, mesh ---------------------------------------------------


def _mesh_context(mesh):
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def fit(scorer: Scorer, features, logits, labels, head, *, mesh=None):
  """`scorer.fit` with its hparams; banks split over `mesh`'s batch axes when given."""
  with _mesh_context(mesh):
    return scorer.fit(features, logits, labels, head, **scorer.hparams)


def score(scorer: Scorer, stats, features, logits, *, mesh=None,
          chunk_size: int = QUERY_CHUNK) -> np.ndarray:
  """[N] float32 scores, from fixed-shape chunks of queries (the last one zero-padded).

  The same for any `chunk_size` and any mesh, up to float32 rounding (a matmul's summation
  order follows its shape). Pass the `mesh` that `fit` had: knn splits its search with it.
  """
  num_rows = len(jax.tree.leaves(features if features is not None else logits)[0])
  parts = []
  with _mesh_context(mesh):
    for start in range(0, num_rows, chunk_size):
      chunks = [jax.tree.map(lambda x, s=start: _replicated(_pad_rows(
          np.asarray(x[s:s + chunk_size]), chunk_size)), rows) for rows in (features, logits)]
      part = scorer.score(stats, *chunks, **scorer.hparams)  # dispatch is async
      if part.shape != (chunk_size,):  # e.g. keepdims: [N, 1] would rank as garbage
        raise ValueError(f'scorer {scorer.name!r} returned scores of shape {part.shape} for '
                         f'{chunk_size} inputs; a score function must return shape [N]')
      parts.append(part)
  scores = np.concatenate([np.asarray(part) for part in parts] or [np.zeros(0)])
  return scores[:num_rows].astype(np.float32)


def _pad_rows(rows: np.ndarray, num_rows: int) -> np.ndarray:
  """`rows` with zero rows appended up to `num_rows` (no copy when there are none)."""
  if len(rows) == num_rows:
    return rows
  return np.pad(rows, [(0, num_rows - len(rows))] + [(0, 0)] * (rows.ndim - 1))


def _batch_axes() -> tuple[str, ...]:
  mesh = jax.sharding.get_abstract_mesh()
  return () if mesh.empty else parallel.batch_axes(mesh)


def _num_shards() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return int(np.prod([mesh.shape[axis] for axis in _batch_axes()], dtype=int))


def _place(rows: np.ndarray, spec: P):
  """Host rows as a global array on the context mesh; unchanged without one.

  Built shard by shard from the host copy every process holds, so it also works on a
  multi-process mesh.
  """
  mesh = jax.sharding.get_mesh()
  if mesh.empty:
    return rows
  return jax.make_array_from_callback(rows.shape, NamedSharding(mesh, spec),
                                      lambda index: rows[index])


def _replicated(rows: np.ndarray):
  return _place(rows, P())


def _split_rows(rows: np.ndarray):
  return _place(rows, P(_batch_axes()))


def _fold_rows(step, total, arrays, chunk_size, *args):
  """Folds `step(total, *chunks, num_valid, *args)` over fixed-shape row chunks.

  One static shape means one compilation, and the host bank moves to the devices one
  chunk at a time, each split over the mesh's batch axes (the sums then all-reduce).
  """
  chunk_size = -(-chunk_size // _num_shards()) * _num_shards()
  num_rows = len(arrays[0])
  total = jax.tree.map(_replicated, total)
  for start in range(0, num_rows, chunk_size):
    chunks = [_split_rows(_pad_rows(np.asarray(a[start:start + chunk_size]), chunk_size))
              for a in arrays]
    total = step(total, *chunks, min(chunk_size, num_rows - start), *args)
  return total


def _valid_rows(rows, num_valid):
  """True for real rows, False for a chunk's zero padding."""
  return jnp.arange(rows.shape[0]) < num_valid


# --- Logit scorers -------------------------------------------------------------------------


def _no_stats(features, logits, labels, head, **hparams):
  """Logit scorers need nothing from the training set."""
  del features, logits, labels, head, hparams
  return {}


def _softmax(logits):
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _msp(stats, features, logits):
  del stats, features
  return jnp.max(_softmax(logits), axis=-1)


def _maxlogit(stats, features, logits):
  del stats, features
  return jnp.max(logits.astype(jnp.float32), axis=-1)


def _energy_of(logits):
  scaled = logits.astype(jnp.float32) / ENERGY_TEMPERATURE
  return ENERGY_TEMPERATURE * jax.nn.logsumexp(scaled, axis=-1)


def _energy(stats, features, logits):
  del stats, features
  return _energy_of(logits)


def _gen(stats, features, logits, *, gamma, top_m):
  """Negative generalized entropy of the top-m probabilities (all when m >= classes)."""
  del stats, features
  probs = _softmax(logits)
  top, index = jax.lax.top_k(probs, min(top_m, logits.shape[-1]))
  # 1 - p is 0 in float32 for p within 6e-8 of 1, and gamma = 0.1 magnifies what is lost
  # ((1e-9)**0.1 = 0.13): the max's complement is the sum of the other probabilities.
  is_max = jnp.arange(probs.shape[-1]) == index[:, :1]
  complement = (1. - top).at[:, 0].set(jnp.sum(jnp.where(is_max, 0., probs), axis=-1))
  return -jnp.sum(top**gamma * complement**gamma, axis=-1)


def _odin(stats, features, logits, *, temperature, epsilon):
  """Max softmax at temperature T, of the logits of `odin_perturb`ed images."""
  del stats, features, epsilon
  return jnp.max(jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1), axis=-1)


def odin_perturb(logits_fn, images, pixel_std, *, temperature, epsilon):
  """ODIN's input step: x - eps / std * sign(d CE(f(x) / T, argmax f(x)) / dx).

  `images` are normalised model inputs, (pixels - mean) / std, channels last, so a pixel
  step eps is eps / std in input space (`pixel_std`: scalar or per channel). The step
  raises the max softmax. A zero gradient steps as +1, as OpenOOD's `ge(grad, 0)`.
  Differentiable `logits_fn` (images -> logits); wrap the call in jit.
  """
  def loss(inputs):
    logits = logits_fn(inputs).astype(jnp.float32)
    predicted = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
    # A sum: each image's gradient is its own loss's.
    return -jnp.sum(jnp.take_along_axis(log_probs, predicted[:, None], axis=-1))

  step = jnp.where(jax.grad(loss)(images) >= 0, 1., -1.)
  return (images - epsilon / jnp.asarray(pixel_std) * step).astype(images.dtype)


def _gradnorm(stats, features, logits):
  """L1 norm of d KL(uniform || softmax(z)) / d kernel, in closed form.

  The loss -1/C sum_c log softmax(z)_c has d/dz = softmax(z) - 1/C, so the kernel's
  gradient is the outer product f (softmax(z) - 1/C) and its L1 norm factorises, exactly
  (the bias moves z, not the kernel's gradient). OpenOOD sums instead of averaging over
  classes: C times this, the same ranking.
  """
  del stats
  probs = _softmax(logits)
  deviation = jnp.sum(jnp.abs(probs - 1. / probs.shape[-1]), axis=-1)
  return deviation * jnp.sum(jnp.abs(features.astype(jnp.float32)), axis=-1)


# --- Head scorers: features reshaped, then the classifier head, then energy ----------------


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


# --- Gaussian scorers: Mahalanobis distances ------------------------------------------------


def _l2_normalize(features):
  features = jnp.asarray(features, jnp.float32)
  norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
  return features / jnp.maximum(norms, 1e-12)  # all-zero rows stay zero, not NaN


def _as_float32(features):
  return jnp.asarray(features, jnp.float32)


def _host_chunks(rows, prepare, chunk_size):
  """(start, `prepare(rows)` as float64) chunk by chunk: statistics that are inverted or
  eigendecomposed are accumulated in float64 on the host, as the references do. OpenOOD's
  MDS (sklearn EmpiricalCovariance, np.cov) and MOOD's ood_utils.py (np.cov,
  np.linalg.pinv) both promote float32 features; a float32 covariance resolves eigenvalues
  only down to ~1e-7 of the largest, and a low-variance ID direction below that is exactly
  where an OOD set may differ (test_scorers.py has such a case). The host holds every row
  anyway, and this is O(N D^2) flops of BLAS."""
  for start in range(0, len(rows), chunk_size):
    yield start, np.asarray(prepare(np.asarray(rows[start:start + chunk_size])), np.float64)


def _group_means(rows, group, num_groups, prepare, chunk_size):
  """float64 mean of `prepare(rows)` per group (0 .. num_groups - 1, each non-empty)."""
  sums = np.zeros((num_groups, rows.shape[1]))
  for start, chunk in _host_chunks(rows, prepare, chunk_size):
    np.add.at(sums, group[start:start + len(chunk)], chunk)
  return sums / np.bincount(group, minlength=num_groups)[:, None]


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


def _whitening(covariance: np.ndarray) -> np.ndarray:
  """W [D, K] with W W^T the float64 pseudo-inverse of `covariance` at scipy.linalg.pinvh's
  default cutoff (eigenvalues below D * float64 eps of the largest dropped), the one OpenOOD's
  sklearn EmpiricalCovariance.precision_ has: no NaN on a rank-deficient bank.

  Scoring then computes ||W^T d||^2, not d^T P d: in float32, P's entries of 1 / (a tiny
  kept eigenvalue) swamp the product with rounding error (on digits, the one direction that
  LayerNorm leaves with ~3e-12 of the largest variance took MOOD's AUROC from 98.5 to 60.4),
  while W's rows scale only by its square root and each projection is of a unit vector.
  """
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  kept = eigenvalues > covariance.shape[0] * np.finfo(np.float64).eps * eigenvalues.max()
  return eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])


def gaussian_stats(moments: Moments) -> dict:
  """Class means and their shared (tied, within-class) precision, as OpenOOD's MDS, the
  precision as its whitening (`_whitening`): the stats of mahalanobis (and, of moments of
  normalised rows, mahalanobis_mood), from `Moments` that may have been added to.

  Only the groups with rows get a mean. Means are kept relative to the overall mean
  (`center`): scoring expands the squared distances around it, where the terms are of the
  distances' own size.
  """
  present = moments.counts > 0
  means = moments.means[present]
  center = moments.pooled().means[0]
  whitening = _whitening(moments.scatter / moments.num_rows)
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
  """MOOD's single Gaussian on L2-normalised ID-train features (biased covariance)."""
  del logits, labels, head
  return gaussian_stats(Moments.of(features, None, _l2_normalize, chunk_size))


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


# --- Bank scorers: knn, NNGuide, Relation --------------------------------------------------
#
# A bank is ID-train rows on the devices, split over the mesh's batch axes. It is written
# there chunk by chunk (the host never holds a prepared copy), and each device scores a
# query chunk against its shard block by block, so the similarities held at once are
# QUERY_CHUNK x BANK_BLOCK whatever the bank's size. Top-k results merge exactly: the k
# best of (the k best so far, a block's k best), then of every shard's k best.


def _bank_layout(num_rows: int) -> tuple[int, int]:
  """(padded rows, block rows): each shard holds a whole number of equal blocks."""
  shards = _num_shards()
  per_shard = -(-num_rows // shards)
  block = min(BANK_BLOCK, per_shard)
  return -(-per_shard // block) * block * shards, block


def _write_rows(prepare, bank, start, *chunks):
  return jax.lax.dynamic_update_slice(bank, prepare(*chunks).astype(bank.dtype), (start, 0))


def device_bank(prepare, arrays, chunk_size: int = CHUNK_SIZE):
  """`prepare(*row chunks of arrays) -> [n, W]` of every row, as a float32 [padded, W]
  device array split over the context mesh (zero rows after the real ones).

  Written in place (a donated buffer), one host chunk at a time: device memory is the
  bank's, host memory one chunk's.
  """
  num_rows = len(arrays[0])
  padded, _ = _bank_layout(num_rows)
  width = jax.eval_shape(prepare, *(jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype)
                                    for a in arrays)).shape[-1]
  mesh = jax.sharding.get_mesh()
  sharding = None if mesh.empty else NamedSharding(mesh, P(_batch_axes()))
  bank = jnp.zeros((padded, width), jnp.float32, device=sharding)
  write = jax.jit(functools.partial(_write_rows, prepare), donate_argnums=0,
                  out_shardings=sharding)
  for start in range(0, num_rows, chunk_size):
    chunks = [_replicated(np.asarray(a[start:start + chunk_size])) for a in arrays]
    bank = write(bank, start, *chunks)  # at most two shapes: full chunks and the last
  return bank


def _over_bank(block_fn, merge, queries, banks, num_valid):
  """merge-folds `block_fn(queries, *bank blocks, valid [block] bool) -> [Q, m]` over the
  blocks of each shard, then over shards (`merge`: ([Q, m], [Q, m]) -> [Q, m], associative).
  """
  axes, num_shards = _batch_axes(), _num_shards()
  block = _bank_layout(banks[0].shape[0])[1]

  def shard_fold(queries, num_valid, *shards):
    first_row = jax.lax.axis_index(axes) * shards[0].shape[0] if axes else 0
    num_blocks = shards[0].shape[0] // block
    if num_blocks * block != shards[0].shape[0]:  # banks are laid out by device_bank
      raise ValueError(f'bank shard of {shards[0].shape[0]} rows is not a whole number of '
                       f'{block}-row blocks')
    blocks = [s.reshape(num_blocks, block, *s.shape[1:]) for s in shards]

    def step(best, xs):
      index, *parts = xs
      valid = first_row + index * block + jnp.arange(block) < num_valid
      found = block_fn(queries, *parts, valid)
      return found if best is None else merge(best, found), None

    first, _ = step(None, (0, *(b[0] for b in blocks)))
    best, _ = jax.lax.scan(step, first, (jnp.arange(1, num_blocks), *(b[1:] for b in blocks)))
    return best

  if not axes:
    return shard_fold(queries, num_valid, *banks)
  fold = jax.shard_map(shard_fold, in_specs=(P(), P(), *(P(axes),) * len(banks)),
                       out_specs=P(None, axes))
  per_shard = fold(queries, num_valid, *banks)  # [Q, shards * m]
  parts = jnp.split(per_shard, num_shards, axis=-1)
  return functools.reduce(merge, parts)


def _top_k_values(values, k):
  """`lax.top_k(values, k)[0]`, read back through the indices to stay fast on CPU.

  With its indices unused, XLA rewrites top_k into a full sort of each row: 90x slower
  on CPU for 50,000 columns, 5x for 400.
  """
  _, index = jax.lax.top_k(values, k)
  return jnp.take_along_axis(values, index, axis=-1)


def _top_similarities(queries, bank, num_valid, k):
  """[Q, k] the k largest inner products of each query with the bank's real rows, exact,
  in descending order."""
  def block_top(queries, rows, valid):
    similarities = jnp.where(valid, jnp.matmul(queries, rows.T, precision=_HIGHEST), -jnp.inf)
    if rows.shape[0] < k:  # a block smaller than k: -inf fills the k columns
      similarities = jnp.pad(similarities, ((0, 0), (0, k - rows.shape[0])),
                             constant_values=-jnp.inf)
    return _top_k_values(similarities, k)

  def merge(best, found):
    return _top_k_values(jnp.concatenate([best, found], axis=-1), k)
  return _over_bank(block_top, merge, queries, (bank,), num_valid)


def _check_bank_rows(name, num_rows, k):
  if num_rows < k:
    raise ValueError(f'{name}: k={k} but the ID-train bank has {num_rows} rows')


def fit_knn(features, logits, labels, head, *, k):
  """The L2-normalised ID-train bank (`device_bank`)."""
  del logits, labels, head
  _check_bank_rows('knn', len(features), k)
  return {'bank': device_bank(_l2_normalize, (features,)),
          'num_valid': jnp.int32(len(features))}


def _knn(stats, features, logits, *, k):
  """Negative squared distance to the k-th neighbour, 2 cos - 2 for unit rows; exact.

  As OpenOOD's (faiss IndexFlatL2 returns squared distances); the ranking of the distance.
  """
  del logits
  nearest = _top_similarities(_l2_normalize(features), stats['bank'], stats['num_valid'], k)
  return 2. * nearest[:, -1] - 2.


def _guided_rows(features, logits):
  return _l2_normalize(features) * _energy_of(logits)[:, None]


def fit_nnguide(features, logits, labels, head, *, k, alpha):
  """NNGuide's bank (OpenOOD nnguide_postprocessor.py): L2-normalised ID-train features
  times their energy, of a fraction `alpha` of ID train. OpenOOD takes the first batches of
  its shuffled loader past alpha N rows; ours a seeded random ceil(alpha N) rows, at least
  k (the reference's default, alpha 0.01 with k 100, needs 10,000 training images)."""
  del labels, head
  _check_bank_rows('nnguide', len(features), k)
  size = min(len(features), max(k, int(np.ceil(alpha * len(features)))))
  rows = np.sort(np.random.default_rng(0).choice(len(features), size, replace=False))
  if size < len(features):
    features, logits = features[rows], logits[rows]
  return {'bank': device_bank(_guided_rows, (features, logits)),
          'num_valid': jnp.int32(size)}


def _nnguide(stats, features, logits, *, k, alpha):
  """Energy times the mean of the k largest inner products of the normalised feature with
  the guided bank (faiss IndexFlatIP there; exact both)."""
  del alpha
  nearest = _top_similarities(_l2_normalize(features), stats['bank'], stats['num_valid'], k)
  return jnp.mean(nearest, axis=-1) * _energy_of(logits)


RELATION_THRESHOLD = 0.03  # OpenOOD's get_relation default: smaller edges are cut


def _relation_norm(features):
  """Relation's own normalisation, x / sqrt(||x||^2 + 1e-10) (relation_postprocessor.py)."""
  features = _as_float32(features)
  return features / jnp.sqrt(jnp.sum(features * features, axis=-1, keepdims=True) + 1e-10)


def fit_relation(features, logits, labels, head, *, pow):  # noqa: A002 (OpenOOD's name)
  """The normalised ID-train features and their softmax, as two banks of the same rows."""
  del labels, head, pow
  return {'bank': device_bank(_relation_norm, (features,)),
          'probs': device_bank(_softmax, (logits,)), 'num_valid': jnp.int32(len(features))}


def _relation(stats, features, logits, *, pow):  # noqa: A002
  """Neural Relation Graph's score (OpenOOD relation_postprocessor.py): the sum over the
  bank of s |s|^(pow - 1), s = max(cos, 0) x (p . p_bank), edges with |s| <= 0.03 cut."""
  def edges(queries, rows, probs, valid):
    features, query_probs = queries
    similarity = jnp.maximum(jnp.matmul(features, rows.T, precision=_HIGHEST), 0.)
    relation = similarity * jnp.matmul(query_probs, probs.T, precision=_HIGHEST)
    kept = valid & (jnp.abs(relation) > RELATION_THRESHOLD)
    return jnp.sum(jnp.where(kept, jnp.sign(relation) * jnp.abs(relation)**pow, 0.), axis=-1,
                   keepdims=True)

  total = _over_bank(edges, jnp.add, (_relation_norm(features), _softmax(logits)),
                     (stats['bank'], stats['probs']), stats['num_valid'])
  return total[:, 0]


# --- Principal-space scorers: ViM and its residual -----------------------------------------


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


# --- KL matching ---------------------------------------------------------------------------


def fit_klm(features, logits, labels, head):
  """Mean softmax of the ID-train samples predicted as each class (predicted classes only:
  OpenOOD's mean over none would be NaN)."""
  del features, labels, head
  predicted, group = np.unique(np.argmax(logits, axis=-1), return_inverse=True)
  templates = _group_means(logits, group, len(predicted), _softmax, CHUNK_SIZE)
  # Floored: a probability that underflowed to 0 would make log 0 * 0 = NaN below.
  return {'log_templates': jnp.log(jnp.maximum(jnp.asarray(templates, jnp.float32),
                                               jnp.finfo(jnp.float32).tiny))}


def _klm(stats, features, logits):
  """-min_c KL(p || template_c), as KL = sum p log p - p . log template."""
  del features
  probs = _softmax(logits)
  neg_entropy = jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1, keepdims=True)
  cross = jnp.matmul(probs, stats['log_templates'].T, precision=_HIGHEST)
  return -jnp.min(neg_entropy - cross, axis=-1)


# --- Head scorers from OpenOOD's later postprocessors ---------------------------------------


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


def _entropy(stats, features, logits):
  """Negative entropy of the softmax, probabilities clipped to [1e-7, 1] as pytorch-ood's
  Entropy (detector/entropy.py), which returns the entropy (higher = OOD)."""
  del stats, features
  probs = jnp.clip(_softmax(logits), 1e-7, 1.)
  return jnp.sum(probs * jnp.log(probs), axis=-1)


def fit_temperature(features, logits, labels, head):
  """The temperature T minimising the float64 NLL of softmax(logits / T) against `labels`,
  as OpenOOD's temp_scaling_postprocessor.py aims at (there LBFGS, lr 0.01, 50 iterations
  from T = 1.5, on ID validation). A one-dimensional bounded Brent search over log T finds
  the minimum itself, not where 50 steps of LBFGS stop."""
  del features, head
  from scipy import optimize, special  # noqa: PLC0415 (host only, at fit time)
  logits, labels = np.float64(logits), np.asarray(labels)

  def nll(log_t):
    scaled = logits / np.exp(log_t)
    return np.mean(special.logsumexp(scaled, axis=-1) - scaled[np.arange(len(labels)), labels])

  best = optimize.minimize_scalar(nll, bounds=(np.log(1e-3), np.log(1e3)), method='bounded',
                                  options={'xatol': 1e-8})
  return {'temperature': jnp.float32(np.exp(best.x))}


def _temperature_scaled_msp(stats, features, logits):
  del features
  return jnp.max(jax.nn.softmax(logits.astype(jnp.float32) / stats['temperature'], axis=-1),
                 axis=-1)


# --- GMM: a tied-covariance Gaussian mixture in a principal subspace ------------------------


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


# --- Layer scorers: several named layers of the network -------------------------------------


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


register(Scorer('msp', _no_stats, _msp, needs_logits=True))
register(Scorer('maxlogit', _no_stats, _maxlogit, needs_logits=True))
register(Scorer('energy', _no_stats, _energy, needs_logits=True))
register(Scorer('gen', _no_stats, _gen, needs_logits=True, hparams={'gamma': 0.1, 'top_m': 100}))
register(Scorer('odin', _no_stats, _odin, needs_logits=True,
                hparams={'temperature': 1000., 'epsilon': 0.0014}, perturb=odin_perturb))
register(Scorer('gradnorm', _no_stats, _gradnorm, needs_logits=True))
register(Scorer('react', fit_react, _react, needs_logits=True, hparams={'percentile': 90}))
# One function, three names: each variant can be named in a config, and swept as an hparam.
for _variant in 'pbs':
  register(Scorer(f'ash_{_variant}', fit_ash, _ash, needs_logits=True,
                  hparams={'variant': _variant, 'percentile': 90}))
register(Scorer('mahalanobis_mood', fit_mahalanobis_mood, _mahalanobis_mood,
                needs_logits=False))
register(Scorer('mahalanobis', fit_mahalanobis, _mahalanobis, needs_logits=False))
register(Scorer('rmds', fit_rmds, _rmds, needs_logits=False))
register(Scorer('knn', fit_knn, _knn, needs_logits=False, hparams={'k': 50}))
register(Scorer('vim', fit_vim, _vim, needs_logits=True, hparams={'dim': None}))
register(Scorer('residual', fit_residual, _residual, needs_logits=True, hparams={'dim': None}))
register(Scorer('klm', fit_klm, _klm, needs_logits=True))
register(Scorer('scale', fit_scale, _scale, needs_logits=True, hparams={'percentile': 85}))
register(Scorer('dice', fit_dice, _dice, needs_logits=True, hparams={'p': 90}))
register(Scorer('she', fit_she, _she, needs_logits=True, hparams={'metric': 'inner_product'}))
register(Scorer('fdbd', fit_fdbd, _fdbd, needs_logits=True,
                hparams={'distance_as_normalizer': True}))
register(Scorer('nci', fit_feature_mean, _nci, needs_logits=True, hparams={'alpha': 1e-4}))
register(Scorer('entropy', _no_stats, _entropy, needs_logits=True))
register(Scorer('temp_scaling', fit_temperature, _temperature_scaled_msp, needs_logits=True,
                fits_on_id_validation=True))
register(Scorer('gmm', fit_gmm, _gmm, needs_logits=False,
                hparams={'num_clusters': 50, 'dim': None}))
register(Scorer('nnguide', fit_nnguide, _nnguide, needs_logits=True,
                hparams={'k': 100, 'alpha': 0.01}))
register(Scorer('relation', fit_relation, _relation, needs_logits=True, hparams={'pow': 1}))
register(Scorer('mds_ensemble', fit_mds_ensemble, _mds_ensemble, needs_logits=False,
                hparams={'layers': 'all'}, forward=_layer_means))
register(Scorer('gram', fit_gram, _gram, needs_logits=True,
                hparams={'layers': 'all', 'powers': GRAM_POWERS}, forward=_layer_grams))
register(Scorer('rankfeat', _no_stats, _rankfeat, needs_logits=True,
                hparams={'temperature': 1.0}, forward=_rankfeat_forward))

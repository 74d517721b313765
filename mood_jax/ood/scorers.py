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

  def __post_init__(self):
    object.__setattr__(self, 'hparams', types.MappingProxyType(dict(self.hparams)))

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
  num_rows = len(features if features is not None else logits)
  parts = []
  with _mesh_context(mesh):
    for start in range(0, num_rows, chunk_size):
      chunks = [None if rows is None else
                _replicated(_pad_rows(np.asarray(rows[start:start + chunk_size]), chunk_size))
                for rows in (features, logits)]
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


def _second_moment(rows, group, centers, prepare, chunk_size):
  """float64 biased covariance of `prepare(rows)` about their group's center."""
  # Centred in the pass, not E[xx^T] - mu mu^T, which cancels.
  centers = np.asarray(centers, np.float64)
  scatter = np.zeros((rows.shape[1],) * 2)
  for start, chunk in _host_chunks(rows, prepare, chunk_size):
    deviations = chunk - centers[group[start:start + len(chunk)]]
    scatter += deviations.T @ deviations
  return scatter / len(rows)


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


def _fit_gaussians(features, labels, prepare, chunk_size, rcond=None):
  """Class means and their shared (tied, within-class) precision, as OpenOOD's MDS, the
  precision as its whitening (`_whitening`, at `rcond`).

  Means are kept relative to the overall mean (`center`): scoring expands the squared
  distances around it, where the terms are of the distances' own size.
  """
  classes, group = np.unique(labels, return_inverse=True)
  means = _group_means(features, group, len(classes), prepare, chunk_size)
  center = np.sum(means * np.bincount(group)[:, None], axis=0) / len(features)
  whitening = _whitening(_second_moment(features, group, means, prepare, chunk_size), rcond)
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
  return _fit_gaussians(features, np.zeros(len(features), np.int32), _l2_normalize,
                        chunk_size, rcond=PINV_RCOND)


def _mahalanobis_mood(stats, features, logits):
  del logits
  return -_class_distances(stats, features, _l2_normalize)[:, 0]


def fit_mahalanobis(features, logits, labels, head, chunk_size: int = CHUNK_SIZE):
  """Lee et al.'s class-conditional Gaussians, features as they are (as OpenOOD's MDS).

  Only the classes present in `labels` get a mean (one-class runs: one Gaussian).
  """
  del logits, head
  return _fit_gaussians(features, labels, _as_float32, chunk_size)


def _mahalanobis(stats, features, logits):
  del logits
  return -jnp.min(_class_distances(stats, features, _as_float32), axis=-1)


def fit_rmds(features, logits, labels, head, chunk_size: int = CHUNK_SIZE):
  """Class Gaussians plus one background Gaussian of all features (Ren et al.)."""
  stats = fit_mahalanobis(features, logits, labels, head, chunk_size)
  background = _second_moment(features, np.zeros(len(features), np.int32),
                              stats['center'][None], _as_float32, chunk_size)
  return {**stats, 'background_whitening': jnp.asarray(_whitening(background), jnp.float32)}


def _rmds(stats, features, logits):
  """Background distance minus the nearest class distance: 0 for a single class."""
  del logits
  whitened = _whitened(features, stats['center'], stats['background_whitening'], _as_float32)
  background = jnp.sum(whitened * whitened, axis=-1)
  return background - jnp.min(_class_distances(stats, features, _as_float32), axis=-1)


# --- knn: k-th nearest ID-train neighbour -------------------------------------------------


_normalize_rows = jax.jit(_l2_normalize)


def fit_knn(features, logits, labels, head, *, k):
  """The L2-normalised ID-train bank, split over the mesh's batch axes.

  Fewer zero rows than shards pad it to equal shards; `num_valid` tells them apart.
  """
  del logits, labels, head
  if len(features) < k:
    raise ValueError(f'knn: k={k} but the ID-train bank has {len(features)} rows')
  shards = _num_shards()
  padded = _pad_rows(np.asarray(features, np.float32), -(-len(features) // shards) * shards)
  return {'bank': _normalize_rows(_split_rows(padded)), 'num_valid': jnp.int32(len(features))}


def _nearest_similarities(queries, bank, num_valid, *, k, axes, num_shards):
  """This shard's largest cosine similarities for each query, padding rows at -inf.

  A shard holds fewer than `num_shards` padding rows, so its k + num_shards - 1 best rows
  hold its k best real ones. Masking those few, not the whole similarity matrix, saves a
  pass over it, and reading the indices keeps top_k fast on CPU (see `_top_k_values`).
  """
  first_row = jax.lax.axis_index(axes) * bank.shape[0] if axes else 0
  similarities = jnp.matmul(queries, bank.T, precision=_HIGHEST)
  top, index = jax.lax.top_k(similarities, min(k + num_shards - 1, bank.shape[0]))
  return jnp.where(first_row + index < num_valid, top, -jnp.inf)


def _top_k_values(values, k):
  """`lax.top_k(values, k)[0]`, read back through the indices to stay fast on CPU.

  With its indices unused, XLA rewrites top_k into a full sort of each row: 90x slower
  on CPU for 50,000 columns, 5x for 400.
  """
  _, index = jax.lax.top_k(values, k)
  return jnp.take_along_axis(values, index, axis=-1)


def _knn(stats, features, logits, *, k):
  """Negative squared distance to the k-th neighbour, 2 cos - 2 for unit rows; exact.

  As OpenOOD's (faiss IndexFlatL2 returns squared distances); the ranking of the distance.
  On a mesh each device ranks its shard of the bank; the k best of all shards' best are
  the exact answer.
  """
  del logits
  axes = _batch_axes()
  nearest = functools.partial(_nearest_similarities, k=k, axes=axes, num_shards=_num_shards())
  if axes:
    nearest = jax.shard_map(nearest, in_specs=(P(), P(axes), P()), out_specs=P(None, axes))
  candidates = nearest(_l2_normalize(features), stats['bank'], stats['num_valid'])
  return 2. * _top_k_values(candidates, k)[:, -1] - 2.


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
  moment = _second_moment(features, np.zeros(len(features), np.int32), origin[None],
                          _as_float32, chunk_size)
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
  """Mean softmax of the ID-train samples predicted as each class, for the predicted classes
  only. OpenOOD (kl_matching_postprocessor.py) gives a class nothing is predicted as a one-hot
  template, whose KL from a softmax that is not exactly one-hot is infinite: it never wins."""
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

"""The registry, the entry points (`fit`, `score`: hparams, chunks, mesh) and the helpers
every scorer family shares."""

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
# Query rows per score step; a bank scorer holds QUERY_CHUNK x bank.BANK_BLOCK similarities.
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


def _no_stats(features, logits, labels, head, **hparams):
  """Logit scorers need nothing from the training set."""
  del features, logits, labels, head, hparams
  return {}


def _softmax(logits):
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _energy_of(logits):
  scaled = logits.astype(jnp.float32) / ENERGY_TEMPERATURE
  return ENERGY_TEMPERATURE * jax.nn.logsumexp(scaled, axis=-1)


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


def _top_k_values(values, k):
  """`lax.top_k(values, k)[0]`, read back through the indices to stay fast on CPU.

  With its indices unused, XLA rewrites top_k into a full sort of each row: 90x slower
  on CPU for 50,000 columns, 5x for 400.
  """
  _, index = jax.lax.top_k(values, k)
  return jnp.take_along_axis(values, index, axis=-1)

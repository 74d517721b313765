"""Bank scorers: knn, NNGuide, Relation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mood_jax.ood.scorers.base import (
    CHUNK_SIZE, Scorer, _HIGHEST, _as_float32, _batch_axes, _energy_of, _l2_normalize,
    _num_shards, _replicated, _softmax, _top_k_values, register)
# Bank rows per similarity block of a bank scorer (knn, nnguide, relation): a query chunk
# holds QUERY_CHUNK x BANK_BLOCK float32 similarities (128 MiB), whatever the bank's size.
BANK_BLOCK = 65536


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

    def found(index):
      # Sliced in the loop, not reshaped and split before it: that would copy the bank.
      parts = [jax.lax.dynamic_slice_in_dim(s, index * block, block) for s in shards]
      valid = first_row + index * block + jnp.arange(block) < num_valid
      return block_fn(queries, *parts, valid)

    return jax.lax.fori_loop(1, num_blocks, lambda index, best: merge(best, found(index)),
                             found(0))

  if not axes:
    return shard_fold(queries, num_valid, *banks)
  fold = jax.shard_map(shard_fold, in_specs=(P(), P(), *(P(axes),) * len(banks)),
                       out_specs=P(None, axes))
  per_shard = fold(queries, num_valid, *banks)  # [Q, shards * m]
  parts = jnp.split(per_shard, num_shards, axis=-1)
  return functools.reduce(merge, parts)


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


register(Scorer('knn', fit_knn, _knn, needs_logits=False, hparams={'k': 50}))

register(Scorer('nnguide', fit_nnguide, _nnguide, needs_logits=True,
                hparams={'k': 100, 'alpha': 0.01}))

register(Scorer('relation', fit_relation, _relation, needs_logits=True, hparams={'pow': 1}))

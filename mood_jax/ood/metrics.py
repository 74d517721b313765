"""OOD detection metrics as OpenOOD and MOOD compute them, ties included.

Scores are "higher = more in-distribution". AUROC, AUPR-In, AUPR-Out and `fpr95` are
OpenOOD's (openood/evaluators/metrics.py, `auc_and_fpr_recall`, on main from 4a72488,
2023-12-18, unchanged through 3c35632; after the v1.5 tag 8d44375: FPR@95 with OOD positive
came in 873e8c2, AUPR-In and -Out the right way round in 4a72488): AUROC is
`auc(roc_curve)`, AUPR-In (ID positive, ranked by score) and AUPR-Out (OOD positive, by
-score) are `auc(recall, precision)` of `precision_recall_curve`, the trapezoid rule through
every distinct threshold and the (recall 0, precision 1) end, not average precision; `fpr95`
is the fraction of ID flagged OOD at the first `roc_curve` point (OOD positive) that catches
95% of OOD. `fpr95_id` is MOOD's (MOODv1/ood_utils.py, `get_fpr`, on distances = -score):
the fraction of OOD scoring strictly above the 5th percentile (NumPy's, linear) of the ID
scores, i.e. OOD accepted when 95% of ID are.

The curves depend on the scores only through their order and ties, which are taken on the
host in the scores' own precision (float64 stays float64); the curves then run jitted on
integer ranks.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _curve(ranked_scores, is_positive):
  """sklearn's confusion counts at every distinct threshold, in per-sample slots.

  `ranked_scores` is ordered from most to least positive-looking. sklearn thresholds
  only at distinct values, so only a tie group's last slot (`is_end`) is a curve
  point; `prev_*` hold the counts at the curve point before it ((0, 0) for the
  first), `next_end` the slot of the one after it (n for the last).
  """
  n = ranked_scores.shape[0]
  slots = jnp.arange(n, dtype=jnp.int32)
  tps = jnp.cumsum(is_positive, dtype=jnp.int32)
  fps = slots + 1 - tps
  is_end = jnp.append(ranked_scores[1:] != ranked_scores[:-1], True)
  last_end_so_far = lax.cummax(jnp.where(is_end, slots, -1))
  first_end_from_here = lax.cummin(jnp.where(is_end, slots, n), reverse=True)
  prev_end = jnp.append(-1, last_end_so_far[:-1])
  # A leading 0 makes slot -1 (no previous point) read as the curve's (0, 0) origin.
  return {
      'tps': tps, 'fps': fps, 'is_end': is_end,
      'prev_tps': jnp.append(0, tps)[prev_end + 1],
      'prev_fps': jnp.append(0, fps)[prev_end + 1],
      'next_end': jnp.append(first_end_from_here[1:], n),
  }


def _auroc(curve):
  """Trapezoidal area under the ROC curve through every distinct threshold."""
  num_pos, num_neg = curve['tps'][-1], curve['fps'][-1]
  # Integer-valued float32 terms and one division: exact on small sets, and no int32
  # overflow on large ones.
  fps_step = (curve['fps'] - curve['prev_fps']).astype(jnp.float32)
  tps_sum = (curve['tps'] + curve['prev_tps']).astype(jnp.float32)
  area = jnp.sum(jnp.where(curve['is_end'], fps_step * tps_sum, 0.))
  return area / (2. * num_pos * num_neg)


def _trapezoid_aupr(curve):
  """sklearn `auc(recall, precision)` of `precision_recall_curve`: trapezoids between
  consecutive distinct thresholds, the first from (recall 0, precision 1)."""
  num_pos = curve['tps'][-1]
  tps = curve['tps'].astype(jnp.float32)
  precision = tps / jnp.arange(1, tps.shape[0] + 1)
  prev_count = curve['prev_tps'] + curve['prev_fps']
  prev_precision = jnp.where(prev_count == 0, 1.,
                             curve['prev_tps'] / jnp.maximum(prev_count, 1))
  recall_step = (curve['tps'] - curve['prev_tps']).astype(jnp.float32)
  area = jnp.sum(jnp.where(curve['is_end'], recall_step * (precision + prev_precision), 0.))
  return area / (2. * num_pos)


def _fpr_at_95_tpr(curve):
  """`fpr[argmax(tpr >= 0.95)]` on `roc_curve`'s output (as OpenOOD's `auc_and_fpr_recall`),
  intermediate points dropped.

  roc_curve keeps a point if it is the first or last, or if its step differs from
  the next one in fps or in tps (nonzero second difference).
  """
  tps, fps, n = curve['tps'], curve['fps'], curve['tps'].shape[0]
  next_slot = jnp.minimum(curve['next_end'], n - 1)
  tps_step, fps_step = tps - curve['prev_tps'], fps - curve['prev_fps']
  is_first = curve['prev_tps'] + curve['prev_fps'] == 0  # only the first follows the origin
  is_kept = curve['is_end'] & (
      is_first | (curve['next_end'] == n)
      | (tps_step != tps_step[next_slot]) | (fps_step != fps_step[next_slot]))
  # Integer form of tps / num_pos >= 0.95: exact, unlike a float32 ratio.
  reaches_95 = 20 * tps >= 19 * tps[-1]
  return fps[jnp.argmax(is_kept & reaches_95)] / fps[-1]


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
  """AUROC, AUPR-In, AUPR-Out, FPR@95 (OpenOOD) and FPR@95 (MOOD's, ID-positive).

  Raises ValueError for scores not shaped [N] (one per sample), for an empty set (every
  metric needs both classes) and for NaN or infinite scores (a sort would rank them
  silently).
  """
  id_scores, ood_scores = np.asarray(id_scores), np.asarray(ood_scores)
  for name, scores in (('ID', id_scores), ('OOD', ood_scores)):
    if scores.ndim != 1:
      raise ValueError(f'ood_metrics: the {name} scores have shape {scores.shape}; expected '
                       'one score per sample, shape [N] (squeeze a trailing axis)')
    if scores.size == 0:
      raise ValueError(f'ood_metrics: the {name} set is empty; every metric needs ID and '
                       'OOD scores')
    num_bad = int(scores.size - np.count_nonzero(np.isfinite(scores)))
    if num_bad:
      raise ValueError(f'ood_metrics: {num_bad} of {scores.size} {name} scores are not '
                       'finite (NaN or inf)')
  # Dense ranks in the input's precision: a float32 cast would merge or reorder close
  # float64 scores (e.g. around 1e8) before JAX sees them.
  _, ranks = np.unique(np.concatenate([id_scores, ood_scores]), return_inverse=True)
  ranks = ranks.astype(np.int32)
  values = jax.device_get(_curve_metrics(ranks[:id_scores.size], ranks[id_scores.size:]))
  # MOOD's get_fpr on distances (-score): OOD with a distance below the ID's 95th percentile.
  fpr95_id = np.mean(-ood_scores < np.percentile(-id_scores, 95))
  return {**{name: float(value) for name, value in values.items()}, 'fpr95_id': float(fpr95_id)}


@jax.jit
def _curve_metrics(id_ranks, ood_ranks):
  scores = jnp.concatenate([id_ranks, ood_ranks])
  is_id = jnp.concatenate([jnp.ones(id_ranks.shape, jnp.int32),
                           jnp.zeros(ood_ranks.shape, jnp.int32)])
  ascending, is_id = lax.sort((scores, is_id), num_keys=1)
  # Ascending order ranks OOD-positive (-score) curves; its reverse ranks ID-positive ones.
  ood_positive = _curve(ascending, 1 - is_id)
  id_positive = _curve(ascending[::-1], is_id[::-1])
  return {
      'auroc': _auroc(id_positive),
      'aupr_in': _trapezoid_aupr(id_positive),
      'aupr_out': _trapezoid_aupr(ood_positive),
      'fpr95': _fpr_at_95_tpr(ood_positive),
  }


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

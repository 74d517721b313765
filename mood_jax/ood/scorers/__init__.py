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
large banks (knn's, nnguide's and relation's ID-train banks, residual's norms) over its
batch axes, so that no device holds a whole bank. Means and covariances are accumulated in
float64 on the host instead, as the references do (`gaussian.Moments`).

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

The families live in modules of this package (`base`: the registry and entry points;
`logits`, `head`, `gaussian`, `principal`, `bank`, `layers`), each registering its scorers
when imported; their public names are importable from here.
"""

# Imported in this order: each family registers its scorers when imported.
from mood_jax.ood.scorers.base import (  # noqa: F401
    CHUNK_SIZE, ENERGY_TEMPERATURE, QUERY_CHUNK, Scorer, configured, fit, get, names,
    needs_train_stats, register, resolve, score)
from mood_jax.ood.scorers.logits import (  # noqa: F401
    fit_klm, fit_temperature, odin_perturb)
from mood_jax.ood.scorers.head import (  # noqa: F401
    fit_ash, fit_dice, fit_fdbd, fit_feature_mean, fit_react, fit_scale, fit_she)
from mood_jax.ood.scorers.gaussian import (  # noqa: F401
    GMM_DIM, Moments, fit_gmm, fit_mahalanobis, fit_mahalanobis_mood, fit_rmds, gaussian_stats)
from mood_jax.ood.scorers.principal import (  # noqa: F401
    fit_residual, fit_vim, principal_dim)
from mood_jax.ood.scorers.bank import (  # noqa: F401
    BANK_BLOCK, RELATION_THRESHOLD, device_bank, fit_knn, fit_nnguide, fit_relation)
from mood_jax.ood.scorers.layers import (  # noqa: F401
    GRAM_POWERS, GRAM_VALIDATION_FRACTION, fit_gram, fit_mds_ensemble, gram_features,
    remove_top_rank)

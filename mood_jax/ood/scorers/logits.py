"""Scorers of the logits alone (and ODIN's input step, temperature scaling, KL matching)."""

import jax
import jax.numpy as jnp
import numpy as np

from mood_jax.ood.scorers.base import (
    CHUNK_SIZE, Scorer, _HIGHEST, _energy_of, _group_means, _no_stats, _softmax, register)


def _msp(stats, features, logits):
  del stats, features
  return jnp.max(_softmax(logits), axis=-1)


def _maxlogit(stats, features, logits):
  del stats, features
  return jnp.max(logits.astype(jnp.float32), axis=-1)


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


register(Scorer('msp', _no_stats, _msp, needs_logits=True))

register(Scorer('maxlogit', _no_stats, _maxlogit, needs_logits=True))

register(Scorer('energy', _no_stats, _energy, needs_logits=True))

register(Scorer('gen', _no_stats, _gen, needs_logits=True, hparams={'gamma': 0.1, 'top_m': 100}))

register(Scorer('odin', _no_stats, _odin, needs_logits=True,
                hparams={'temperature': 1000., 'epsilon': 0.0014}, perturb=odin_perturb))

register(Scorer('gradnorm', _no_stats, _gradnorm, needs_logits=True))

register(Scorer('klm', fit_klm, _klm, needs_logits=True))

register(Scorer('entropy', _no_stats, _entropy, needs_logits=True))

register(Scorer('temp_scaling', fit_temperature, _temperature_scaled_msp, needs_logits=True,
                fits_on_id_validation=True))

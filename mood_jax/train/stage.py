"""What a training stage is, described once from its config: the pipeline trains it, and the
dry run, the tests and the benchmarks compile that same step (`train_loop.make_train_step`).

Each training stage module (mood_jax/stages/) has `describe(config) -> TrainingStage`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import linen as nn

# loss_fn(params, batch, rng) -> (loss, aux): aux's scalars are logged as metrics; arrays
# (e.g. pretrain's masks) are there for whoever compiles the step with its outputs.
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
# batch_loss(mean loss of the whole batch) -> (objective, aux metrics), e.g. flooding
BatchLossFn = Callable[[jax.Array], tuple[jax.Array, dict]]


def rng_stream(seed: int, number: int) -> jax.Array:
  """The key of random stream `number`, drawn from config.seed; parameter init uses the
  seed's own key.

  Each stage numbers its streams in its module's RNG_STREAMS, one per use, so that a setting
  that changes one use (e.g. drop path) leaves the others' draws as they were; the stage
  registry (mood_jax/stages/__init__.py) refuses two uses of one number. The numbers are
  part of every saved run's results: never renumber.
  """
  return jax.random.fold_in(jax.random.key(seed), number)


@dataclasses.dataclass(frozen=True)
class TrainingStage:
  """Everything that defines a training stage's step; what a run adds (data, start params,
  a teacher's logits, evaluation) is given to `train_loop.train` by the stage's `run`."""
  name: str
  cfg: ml_collections.ConfigDict  # the stage's config block, config[name]
  model: nn.Module
  init_params: Callable[[], Any]  # fresh params, seeded by config.seed
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  loss_fn: LossFn
  rng: jax.Array  # the step's stream: step i draws from fold_in(rng, i)
  # Per-example float32 inputs the loss reads beside 'image' and 'label', by shape (after
  # the batch dim); the run adds them to each batch.
  batch_fields: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  batch_loss: BatchLossFn | None = None

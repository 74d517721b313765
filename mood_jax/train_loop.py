"""The training loop every training stage shares: init or resume, jitted step, logs, checkpoints."""

import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mood_jax import checkpoint, metrics_log, parallel
from mood_jax.errors import UserError

# loss_fn(params, batch, rng) -> (loss, aux metrics)
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, 'ckpt', stage)


def final_step(workdir: str, stage: str) -> int | None:
  """Latest saved step of a stage, or None; reads only the directory listing."""
  path = checkpoint_dir(workdir, stage)
  if not os.path.isdir(path):
    return None
  return checkpoint.manager(path).latest_step()


def abstract_state(init_params: Callable[[], Any], tx: optax.GradientTransformation, mesh):
  """Shapes and shardings of the train state, without allocating it (params replicated)."""
  def init():
    params = init_params()
    return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params))
  shapes = jax.eval_shape(init)
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), shapes)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return init, abstract, shardings


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, rng: jax.Array,
                    state_shardings, mesh):
  def train_step(state: TrainState, batch: dict):
    step_rng = jax.random.fold_in(rng, state.step)  # resumable: no RNG state to checkpoint
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    return state, {'loss': loss, 'grad_norm': optax.global_norm(grads), **aux}

  return jax.jit(train_step,
                 in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=0)


def _check_finite(stage: str, first_step: int, step: int, metrics: dict) -> None:
  for name, value in metrics.items():
    if not math.isfinite(value):
      raise UserError(
          f'{stage}: {name} is {value} in steps {first_step}-{step}; no checkpoint was '
          f'written for them. '
          f'Lower --config.{stage}.lr or enable --config.{stage}.grad_clip')


def train(stage: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
          workdir: str, *, init_params: Callable[[], Any], loss_fn: LossFn,
          tx: optax.GradientTransformation, lr_schedule: optax.Schedule, data_iter, mesh,
          rng: jax.Array, initial_params: Callable[[], Any] | None = None,
          batch_fn: Callable[[dict], dict] | None = None) -> TrainState:
  """Runs `cfg.num_steps` steps, resuming from the stage's latest checkpoint if any.

  `initial_params()` (e.g. a pretrained encoder merged into a fresh head) replaces
  `init_params()` for a fresh start; it is not called when resuming. `batch_fn` adds
  derived inputs to each global batch (e.g. a frozen teacher's logits) before the step.
  Logged metrics are means over the steps since the previous log line.
  """
  init, abstract, shardings = abstract_state(init_params, tx, mesh)
  mngr = checkpoint.manager(checkpoint_dir(workdir, stage), max_to_keep=cfg.keep_checkpoints)
  latest = mngr.latest_step()
  if latest is not None:
    logging.info('[%s] resuming from step %d', stage, latest)
    state = checkpoint.restore(mngr, latest, abstract, data_iter)
  elif initial_params is not None:
    state = jax.jit(lambda p: TrainState(np.int32(0), p, tx.init(p)),
                    out_shardings=shardings)(initial_params())
  else:
    state = jax.jit(init, out_shardings=shardings)()

  train_step = make_train_step(loss_fn, tx, rng, shardings, mesh)
  start = int(state.step)
  tick, tick_step = time.perf_counter(), start
  window, window_steps = None, 0  # metric sums on device: no host sync between log lines
  try:
    for step in range(start + 1, cfg.num_steps + 1):
      batch = parallel.global_batch(next(data_iter), mesh)
      if batch_fn is not None:
        batch = batch_fn(batch)
      state, metrics = train_step(state, batch)
      window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
      window_steps += 1
      if step == start + 1:  # keep compilation out of the images/s figures
        jax.block_until_ready(state)
        logging.info('[%s] first step, compilation included: %.1fs', stage,
                     time.perf_counter() - tick)
        tick, tick_step = time.perf_counter(), step
      must_save = step % cfg.ckpt_every == 0 or step == cfg.num_steps
      if step % cfg.log_every == 0 or must_save:  # every save is checked for finite values
        metrics = {k: float(v) / window_steps for k, v in jax.device_get(window).items()}
        _check_finite(stage, step - window_steps + 1, step, metrics)
        window, window_steps = None, 0
        now = time.perf_counter()
        if step > tick_step:
          metrics['images_per_s'] = cfg.batch_size * (step - tick_step) / (now - tick)
        metrics['lr'] = float(lr_schedule(step - 1))
        tick, tick_step = now, step
        metrics_log.write(workdir, stage, step, metrics)
      if must_save:
        checkpoint.save(mngr, step, state, data_iter, config)
  finally:  # an async save still in flight would be lost on exit
    mngr.wait_until_finished()
    mngr.close()
  return state


def restore_params(workdir: str, stage: str, init_params: Callable[[], Any],
                   tx: optax.GradientTransformation, mesh):
  """Params of a finished earlier stage (e.g. pretrain for finetune), placed by `mesh`."""
  path = checkpoint_dir(workdir, stage)
  mngr = checkpoint.manager(path) if os.path.isdir(path) else None
  step = mngr.latest_step() if mngr else None
  if step is None:
    raise UserError(f'no {stage} checkpoint in {path}: '
                    f'run the {stage} stage first (add it to --config.stages)')
  _, abstract, _ = abstract_state(init_params, tx, mesh)
  params = checkpoint.restore(mngr, step, abstract).params
  mngr.close()
  return params

"""The training loop every training stage shares: init or resume, jitted step, logs, checkpoints."""

import math
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mood_jax import parallel, watchdog
from mood_jax.data import input_pipeline
from mood_jax.errors import UserError
from mood_jax.exit_now import PREEMPTED_EXIT_CODE
from mood_jax.models import vit
from mood_jax.train import checkpoint, metrics_log, progress, utilisation
from mood_jax.train.stage import LossFn, TrainingStage


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def abstract_state(stage: TrainingStage, placement: parallel.Placement):
  """(init, abstract state, shardings): the stage's train state's shapes as `placement`
  places them, without allocating it; `jax.jit(init, out_shardings=shardings)` creates it."""
  def init():
    params = stage.init_params()
    return TrainState(step=np.int32(0), params=params, opt_state=stage.tx.init(params))
  abstract = placement.placed(jax.eval_shape(init))
  return init, abstract, jax.tree.map(lambda s: s.sharding, abstract)


def _micro_batches(batch: dict, num_micro: int, mesh) -> dict:
  """[B, ...] -> [num_micro, B / num_micro, ...], micro-batch i holding rows i, i + n, ...

  Strided, not contiguous: each device's rows spread over every micro-batch, so each one
  stays split over all devices (a contiguous slice would sit on 1/n of them).
  """
  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, parallel.stacked_batch_sharding(mesh))
  return jax.tree.map(split, batch)


def accumulated(grad_fn, num_micro: int, mesh):
  """`grad_fn(params, batch, rng)` over `num_micro` micro-batches in sequence, outputs
  averaged: one update from a global batch larger than memory holds. Micro-batch i draws
  its randomness from fold_in(rng, i)."""
  if num_micro == 1:
    return grad_fn

  def accumulated_grad_fn(params, batch, rng):
    micro = _micro_batches(batch, num_micro, mesh)

    def add(total, index_and_batch):
      index, micro_batch = index_and_batch
      out = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, first, rng))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(num_micro), micro))
    return jax.tree.map(lambda x: x / num_micro, total)

  return accumulated_grad_fn


def _scalar_aux(loss_fn: LossFn) -> LossFn:
  """`loss_fn` with only the scalars of its aux: the metrics (arrays such as masks would be
  carried through gradient accumulation and returned every step for nothing)."""
  def scalar_loss_fn(params, batch, rng):
    loss, aux = loss_fn(params, batch, rng)
    return loss, {name: value for name, value in aux.items() if jnp.ndim(value) == 0}
  return scalar_loss_fn


def make_train_step(stage: TrainingStage, state_shardings, mesh, with_outputs: bool = False):
  """The stage's jitted step, `state, batch -> state, metrics`. Its `batch_loss`, if any, is
  applied to the whole batch's mean loss, after accumulation: by the chain rule its
  derivative there scales the accumulated gradient, so a non-linear objective of the batch
  mean (flooding) is the same for any `grad_accum_steps`. `with_outputs`: the loss's array
  aux (e.g. masks) are returned too, for tests."""
  loss_fn = stage.loss_fn if with_outputs else _scalar_aux(stage.loss_fn)
  grad_fn = accumulated(jax.value_and_grad(loss_fn, has_aux=True), stage.cfg.grad_accum_steps,
                        mesh)
  tx, batch_loss = stage.tx, stage.batch_loss

  def train_step(state: TrainState, batch: dict):
    step_rng = jax.random.fold_in(stage.rng, state.step)  # resumable: no RNG state to save
    (loss, aux), grads = grad_fn(state.params, batch, step_rng)
    if batch_loss is not None:
      (loss, batch_aux), slope = jax.value_and_grad(batch_loss, has_aux=True)(loss)
      grads = jax.tree.map(lambda g: g * slope.astype(g.dtype), grads)
      aux = {**aux, **batch_aux}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}

  return jax.jit(train_step,
                 in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=0)


@jax.jit
def _add_to_window(window, metrics: dict, step: jax.Array):
  """Sums a step's metrics into the log window (on device: no host sync per step) and keeps
  the metrics of the window's first step with a non-finite one."""
  if window is None:
    zeros = jax.tree.map(jnp.zeros_like, metrics)
    window = {'sums': zeros, 'first_nonfinite_step': jnp.int32(-1), 'first_nonfinite': zeros}
  first = (window['first_nonfinite_step'] < 0) & ~jnp.all(
      jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(metrics)]))
  return {'sums': jax.tree.map(jnp.add, window['sums'], metrics),
          'first_nonfinite_step': jnp.where(first, step, window['first_nonfinite_step']),
          'first_nonfinite': jax.tree.map(lambda old, new: jnp.where(first, new, old),
                                          window['first_nonfinite'], metrics)}


def _fix_hint(stage: str) -> str:
  return f'Lower --config.{stage}.lr or set --config.{stage}.grad_clip'


def _window_means(stage: str, window: dict, window_steps: int) -> dict:
  """Means of the window's metrics; a UserError if any step had a non-finite one."""
  window = jax.device_get(window)
  step = int(window['first_nonfinite_step'])
  if step >= 0:
    bad = ', '.join(f'{k}={v}' for k, v in window['first_nonfinite'].items()
                    if not math.isfinite(v))
    raise UserError(f'{stage}: {bad} at step {step}; stopped with no checkpoint of it or a '
                    f'later step. {_fix_hint(stage)}')
  return {k: float(v) / window_steps for k, v in window['sums'].items()}


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def check_state_finite(stage: str, step: int, state: TrainState) -> None:
  """Finite loss and gradients do not bound an update (e.g. a huge lr): check what is saved."""
  finite = jax.tree_util.tree_flatten_with_path(jax.device_get(_finite_leaves(state)))[0]
  bad = [jax.tree_util.keystr(path) for path, ok in finite if not ok]
  if bad:
    raise UserError(f'{stage}: non-finite values in {", ".join(bad[:3])}'
                    f'{" ..." if len(bad) > 3 else ""} after step {step}; stopped without '
                    f'saving it. {_fix_hint(stage)}')


class Preempted(BaseException):
  """The run stopped on a preemption notice or Ctrl-C, whatever could be saved saved.

  A BaseException, as KeyboardInterrupt: a signal that arrives while, e.g., a checkpoint is
  read must not be taken for a damaged file by an `except Exception`."""


def stop_signals() -> tuple[signal.Signals, ...]:
  """The signals a run stops on with PREEMPTED_EXIT_CODE: SIGINT (Ctrl-C), and SIGTERM
  unless JAX's distributed runtime handles it (several processes; see below)."""
  return (signal.SIGINT,) + ((signal.SIGTERM,) if jax.process_count() == 1 else ())


class _PreemptionNotice:
  """Tells at each step whether the run is being preempted.

  Single-process runs catch SIGTERM and SIGINT themselves (the handler only sets a flag).
  With several processes, JAX's distributed runtime handles SIGTERM and agrees on a step at
  which every process saves: orbax's `reached_preemption`, so no handler is installed over
  it; SIGINT stops them at once (`main.stop`), since a save on one process alone would hang.
  """

  def __init__(self, mngr):
    self._mngr = mngr
    self._signalled = False
    self._previous_handlers = {}

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous_handlers = {sig: signal.signal(sig, self._on_signal)
                                 for sig in stop_signals()}
    return self

  def __exit__(self, *exc_info):
    for sig, handler in self._previous_handlers.items():
      # None: the previous handler was not set from Python
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    return self._signalled or self._mngr.reached_preemption(step)


def _step_flops(stage: TrainingStage, config: ml_collections.ConfigDict,
                placement: parallel.Placement) -> float:
  """FLOPs of one step per device, XLA's count as the dry run makes it."""
  from mood_jax.run import dry_run  # noqa: PLC0415 (dry_run builds on this module)
  return dry_run.step_flops(stage.name, config, placement)


def train(stage: TrainingStage, config: ml_collections.ConfigDict, workdir: str,
          placement: parallel.Placement, *, start_params: Callable[[], Any] | None = None,
          batch_fn: Callable[[dict], dict] | None = None, keep_steps: tuple[int, ...] = (),
          eval_fn: Callable[[Any], dict] | None = None, later_images: int = 0) -> TrainState:
  """Runs the stage's `num_steps` steps on ID training batches, resuming from its latest
  checkpoint if any.

  `start_params()` (e.g. a pretrained encoder merged into a fresh head) replaces
  `stage.init_params()` for a fresh start; it is not called when resuming. `batch_fn` adds
  the stage's `batch_fields` to each global batch (e.g. a frozen teacher's logits).
  Checkpoints of `keep_steps` are kept beside the latest `keep_checkpoints`. Logged metrics
  are means over the steps since the previous log line. `eval_fn(params)` runs every
  `eval_every` steps and at the last, its metrics logged as kind 'eval'. On a preemption
  notice it saves at the end of the current step and raises `Preempted`. `later_images`:
  the images the run's later training stages still train on, for the run's ETA.
  """
  name, cfg, tx, mesh = stage.name, stage.cfg, stage.tx, placement.mesh
  data_iter = iter(input_pipeline.train_dataset(config.data, global_batch_size=cfg.batch_size,
                                                seed=config.seed, augment=cfg.augment))
  clock = progress.Clock(cfg.num_steps, cfg.batch_size, later_images)
  init, abstract, shardings = abstract_state(stage, placement)
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(workdir, name), cfg, keep_steps)
  profiler = utilisation.Profiler(workdir, config.profile_steps)
  try:
    state = checkpoint.restore_latest(mngr, abstract, data_iter)
    if state is not None:
      logging.info('[%s] resuming from step %d', name, int(state.step))
    elif start_params is not None:
      state = jax.jit(lambda p: TrainState(np.int32(0), p, tx.init(p)),
                      out_shardings=shardings)(start_params())
    else:
      state = jax.jit(init, out_shardings=shardings)()

    train_step = make_train_step(stage, shardings, mesh)
    logging.info('[%s] compute: %s', name, vit.compute_record(config.model))
    # MFU only where the device's peak is known: elsewhere (CPU) the FLOPs are not counted.
    peak, _ = utilisation.peak_flops(jax.devices()[0].device_kind)
    flops = _step_flops(stage, config, placement) if peak else None
    start = int(state.step)
    tick, tick_step = time.perf_counter(), start
    window, window_steps = None, 0
    with (_PreemptionNotice(mngr) as preemption,
          metrics_log.Writer(workdir, name, first_step=start + 1) as writer):
      for step in range(start + 1, cfg.num_steps + 1):
        batch = parallel.global_batch(next(data_iter), mesh)
        if batch_fn is not None:
          batch = batch_fn(batch)
        watchdog.beat(f'{name} step {step}', compiling=step == start + 1)
        profiler.before(step)
        state, metrics = train_step(state, batch)
        profiler.after(step, state)
        window = _add_to_window(window, metrics, state.step)
        window_steps += 1
        if step == start + 1:  # keep compilation out of the images/s figures
          jax.block_until_ready(state)
          logging.info('[%s] first step, compilation included: %.1fs', name,
                       time.perf_counter() - tick)
          tick, tick_step = time.perf_counter(), step
          clock.compiled(step)
        preempted = preemption.reached(step)
        must_save = preempted or step % cfg.ckpt_every == 0 or step == cfg.num_steps
        if step % cfg.log_every == 0 or must_save:  # every save is checked for finite values
          metrics = _window_means(name, window, window_steps)
          window, window_steps = None, 0
          now = time.perf_counter()
          if step > tick_step:
            metrics['images_per_s'] = cfg.batch_size * (step - tick_step) / (now - tick)
            if peak:
              metrics['mfu'] = utilisation.mfu(flops, metrics['images_per_s'], cfg.batch_size,
                                               peak)
          metrics['lr'] = float(stage.lr_schedule(step - 1))
          tick, tick_step = now, step
          writer.write(step, metrics, progress=clock.line(step))
        if eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.num_steps):
          eval_start = time.perf_counter()
          writer.write(step, eval_fn(state.params), kind='eval')
          spent = time.perf_counter() - eval_start
          tick += spent  # not training time: out of images/s and the ETA's speed
          clock.exclude(spent)
        if must_save:
          check_state_finite(name, step, state)
          checkpoint.save(mngr, step, state, data_iter, config)
        if preempted:
          mngr.wait_until_finished()
          logging.warning('[%s] preempted: saved step %d in %s', name, step, mngr.directory)
          raise Preempted(f'{name} preempted at step {step}; its checkpoint is saved')
    logging.info('[%s] done: %s', name, clock.summary(cfg.num_steps - start, jax.device_count()))
  finally:  # an async save still in flight would be lost on exit
    profiler.stop()
    mngr.wait_until_finished()
    mngr.close()
  return state

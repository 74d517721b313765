"""`--config.dry_run=True`: compile every selected stage's step for the full config, from
abstract inputs (no data, no checkpoints, nothing written), and report what it would cost.

With `--config.dry_run_devices=N` the steps compile for N fake CPU devices (the mesh in
`config.mesh` over them), so a pod's config can be checked on a laptop before renting it.
XLA's memory analysis and FLOP count are of the compiled SPMD program, so both are per
device.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mood_jax import inference, parallel, train_loop
from mood_jax.data import input_pipeline
from mood_jax.stages import finetune, logit_ft, pretrain

_GIB = 2.0**30


def _training_parts(name: str, config: ml_collections.ConfigDict):
  """(model, init_params, optimizer, loss_fn, extra batch fields) of a training stage."""
  if name == 'pretrain':
    model, init_params, tx, _ = pretrain.setup(config)
    return model, init_params, tx, pretrain.make_loss_fn(config, model), {}
  if name == 'finetune':
    model, init_params, tx, _ = finetune.setup(config)
    return model, init_params, tx, finetune.make_loss_fn(config.finetune, model), {}
  cfg = config.logit_ft
  model, init_params, tx, _ = logit_ft.setup(config)
  gamma = 1.0 if cfg.loss == 'um' else None  # a value only: the shapes are what compile
  extra = ({'teacher_logits': (input_pipeline.num_classes(config.data),)}
           if cfg.teacher_alpha < 1 else {})
  return model, init_params, tx, logit_ft.make_loss_fn(model, cfg, gamma), extra


def _images(config, batch_size: int, mesh) -> jax.ShapeDtypeStruct:
  size, channels = config.data.image_size, input_pipeline.num_channels(config.data)
  return jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32,
                              sharding=parallel.batch_sharding(mesh))


def _report(what: str, compiled, batch_size: int, mesh) -> dict:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # a list of one in older JAX
  devices = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh)]))
  return {'what': what, 'batch_per_device': batch_size // devices,
          'params_and_inputs_gib': memory.argument_size_in_bytes / _GIB,
          'outputs_gib': memory.output_size_in_bytes / _GIB,
          'temporaries_gib': memory.temp_size_in_bytes / _GIB,
          'flops_per_device': float(cost.get('flops', float('nan')))}


def compile_steps(config: ml_collections.ConfigDict, stages: list[str], mesh) -> list[dict]:
  """Compiles each training stage's step and the evaluation forward; one report each."""
  reports = []
  for name in stages:
    if name == 'evaluate':
      model, init_params, _, _ = finetune.setup(config)
      params = train_loop.placed(jax.eval_shape(init_params), mesh, config.sharding_rules)
      batch_size = config.evaluate.batch_size
      forward = inference.make_forward(model, mesh)
      compiled = forward.lower(params, _images(config, batch_size, mesh)).compile()
    else:
      cfg = config[name]
      model, init_params, tx, loss_fn, extra = _training_parts(name, config)
      _, state, shardings = train_loop.abstract_state(init_params, tx, mesh,
                                                      config.sharding_rules)
      step = train_loop.make_train_step(loss_fn, tx, jax.random.key(0), shardings, mesh,
                                        cfg.grad_accum_steps)
      batch_size, sharding = cfg.batch_size, parallel.batch_sharding(mesh)
      batch = {'image': _images(config, batch_size, mesh),
               'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
               **{field: jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32,
                                              sharding=sharding)
                  for field, shape in extra.items()}}
      compiled = step.lower(state, batch).compile()
    reports.append(_report(name, compiled, batch_size, mesh))
  return reports


def table(reports: list[dict], mesh) -> str:
  lines = [f'Dry run on {jax.device_count()} {jax.devices()[0].platform} devices, mesh '
           f'{dict(mesh.shape)}; memory and FLOPs per device, from XLA\'s compiled program',
           '| step | batch/device | params+inputs GiB | outputs GiB | temporaries GiB | '
           'GFLOPs/step |', '|---|---:|---:|---:|---:|---:|']
  for r in reports:
    lines.append(f'| {r["what"]} | {r["batch_per_device"]} | {r["params_and_inputs_gib"]:.3f} '
                 f'| {r["outputs_gib"]:.3f} | {r["temporaries_gib"]:.3f} '
                 f'| {r["flops_per_device"] / 1e9:.1f} |')
  return '\n'.join(lines)

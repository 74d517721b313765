"""`--config.dry_run=True`: compile every selected stage's step for the full config, from
abstract inputs (no data, no checkpoints, nothing written), and report what it would cost.

With `--config.dry_run_devices=N` the steps compile for N fake CPU devices (the mesh in
`config.mesh` over them), so a pod's config can be checked on a laptop before renting it.
Memory is XLA's analysis of the compiled SPMD program, so it is per device. FLOPs are XLA's
count on the lowered program with its loops unrolled (a loop's body is counted once, not per
trip), divided by the devices.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mood_jax import inference, parallel, train_loop
from mood_jax.data import catalogue
from mood_jax.stages import finetune, logit_ft, pretrain

_GIB = 2.0**30


def _training_parts(name: str, config: ml_collections.ConfigDict):
  """(model, init_params, optimizer, loss_fn, extra batch fields, batch_loss) of a training
  stage."""
  if name == 'pretrain':
    model, init_params, tx, _ = pretrain.setup(config)
    return model, init_params, tx, pretrain.make_loss_fn(model, config.pretrain), {}, None
  if name == 'finetune':
    model, init_params, tx, _ = finetune.setup(config)
    return model, init_params, tx, finetune.make_loss_fn(model, config.finetune), {}, None
  cfg = config.logit_ft
  model, init_params, tx, _ = logit_ft.setup(config)
  gamma = 1.0 if cfg.loss == 'um' else None  # a value only: the shapes are what compile
  extra = ({'teacher_logits': (catalogue.source(config.data).num_classes(),)}
           if cfg.teacher_alpha < 1 else {})
  return (model, init_params, tx, logit_ft.make_loss_fn(model, cfg, gamma), extra,
          logit_ft.make_batch_loss(cfg, gamma))


def _images(config, batch_size: int, mesh) -> jax.ShapeDtypeStruct:
  size, channels = config.data.image_size, catalogue.source(config.data).channels
  return jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32,
                              sharding=parallel.batch_sharding(mesh))


def _lower(name: str, config: ml_collections.ConfigDict, mesh) -> tuple[jax.stages.Lowered, int]:
  """(the lowered step of stage `name`, its global batch size), from abstract inputs."""
  if name == 'evaluate':
    model, init_params, _, _ = finetune.setup(config)
    params = train_loop.placed(jax.eval_shape(init_params), mesh, config.sharding_rules)
    batch_size = config.evaluate.batch_size
    forward = inference.make_forward(model, mesh)
    return forward.lower(params, _images(config, batch_size, mesh)), batch_size
  cfg = config[name]
  model, init_params, tx, loss_fn, extra, batch_loss = _training_parts(name, config)
  _, state, shardings = train_loop.abstract_state(init_params, tx, mesh, config.sharding_rules)
  step = train_loop.make_train_step(loss_fn, tx, jax.random.key(0), shardings, mesh,
                                    cfg.grad_accum_steps, batch_loss)
  batch_size, sharding = cfg.batch_size, parallel.batch_sharding(mesh)
  batch = {'image': _images(config, batch_size, mesh),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
           **{field: jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32, sharding=sharding)
              for field, shape in extra.items()}}
  return step.lower(state, batch), batch_size


def _unrolled(name: str, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The config with the step's loops unrolled (no scan over blocks, one micro-batch), or
  None when it has none: XLA's cost analysis counts a loop body once, not per trip."""
  accumulates = name != 'evaluate' and config[name].grad_accum_steps > 1
  if not (config.model.scan or accumulates):
    return None
  config = config.copy_and_resolve_references()
  config.model.scan = False
  if accumulates:
    config[name].grad_accum_steps = 1  # the same batch in one go: the same FLOPs
  return config


def compile_steps(config: ml_collections.ConfigDict, stages: list[str], mesh) -> list[dict]:
  """Compiles each training stage's step and the evaluation forward; one report each.
  Memory is the compiled program's; FLOPs are the lowered program's (of the whole mesh,
  divided by its devices), counted with loops unrolled."""
  reports = []
  for name in stages:
    lowered, batch_size = _lower(name, config, mesh)
    memory = lowered.compile().memory_analysis()
    unrolled = _unrolled(name, config)
    counted = _lower(name, unrolled, mesh)[0] if unrolled else lowered
    devices = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh)]))
    reports.append({'what': name, 'batch_per_device': batch_size // devices,
                    'params_and_inputs_gib': memory.argument_size_in_bytes / _GIB,
                    'outputs_gib': memory.output_size_in_bytes / _GIB,
                    # outputs that reuse donated inputs' buffers (the train state)
                    'aliased_gib': memory.alias_size_in_bytes / _GIB,
                    'temporaries_gib': memory.temp_size_in_bytes / _GIB,
                    'flops_per_device': counted.cost_analysis()['flops'] / mesh.size})
  return reports


def table(reports: list[dict], mesh) -> str:
  lines = [f'Dry run on {jax.device_count()} {jax.devices()[0].platform} devices, mesh '
           f'{dict(mesh.shape)}; memory (XLA\'s compiled program) and FLOPs per device',
           '| step | batch/device | params+inputs GiB | outputs GiB | temporaries GiB | '
           'GFLOPs/step |', '|---|---:|---:|---:|---:|---:|']
  for r in reports:
    lines.append(f'| {r["what"]} | {r["batch_per_device"]} | {r["params_and_inputs_gib"]:.3f} '
                 f'| {r["outputs_gib"]:.3f} | {r["temporaries_gib"]:.3f} '
                 f'| {r["flops_per_device"] / 1e9:.1f} |')
  return '\n'.join(lines)

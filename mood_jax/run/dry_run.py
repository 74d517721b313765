"""`--config.dry_run=True`: compile every selected stage's step for the full config, from
abstract inputs (no data, no checkpoints, nothing written), and report what it would cost.

With `--config.dry_run_devices=N` the steps compile for N fake CPU devices (the mesh in
`config.mesh` over them), so a pod's config can be checked on a laptop before renting it.
Memory is XLA's analysis of the compiled SPMD program, so it is per device. FLOPs are XLA's
count on the lowered program with its loops unrolled (a loop's body is counted once, not per
trip), divided by the devices. `model.dtype` and `model.attention` 'auto' resolve for the machine
the run is for: this one's backend, or an accelerator's with fake devices (`for_target`).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mood_jax import parallel, stages
from mood_jax.ood import extraction
from mood_jax.train import loop as train_loop
from mood_jax.data import catalogue
from mood_jax.models import vit
from mood_jax.stages import finetune

_GIB = 2.0**30


def _images(config, batch_size: int, mesh) -> jax.ShapeDtypeStruct:
  size, channels = config.data.image_size, catalogue.source(config.data).channels
  return jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32,
                              sharding=parallel.batch_sharding(mesh))


def _lower(name: str, config: ml_collections.ConfigDict,
           placement: parallel.Placement) -> tuple[jax.stages.Lowered, int]:
  """(the lowered step of stage `name`, its global batch size), from abstract inputs."""
  mesh = placement.mesh
  if name == 'evaluate':
    model, init_params = finetune.classifier(config, drop_path=0.0)
    params = placement.placed(jax.eval_shape(init_params))
    batch_size = config.evaluate.batch_size
    forward = extraction.make_forward(model, mesh)
    return forward.lower(params, _images(config, batch_size, mesh)), batch_size
  stage = stages.TRAINING[name].describe(config)
  _, state, shardings = train_loop.abstract_state(stage, placement)
  step = train_loop.make_train_step(stage, shardings, mesh)
  batch_size, sharding = stage.cfg.batch_size, parallel.batch_sharding(mesh)
  batch = {'image': _images(config, batch_size, mesh),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
           **{field: jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32, sharding=sharding)
              for field, shape in stage.batch_fields.items()}}
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


def compile_steps(config: ml_collections.ConfigDict, stages: list[str],
                  placement: parallel.Placement) -> list[dict]:
  """Compiles each training stage's step and the evaluation forward; one report each.
  Memory is the compiled program's; FLOPs are the lowered program's (of the whole mesh,
  divided by its devices), counted with loops unrolled."""
  reports, mesh = [], placement.mesh
  for name in stages:
    lowered, batch_size = _lower(name, config, placement)
    memory = lowered.compile().memory_analysis()
    devices = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh)]))
    reports.append({'what': name, 'batch_per_device': batch_size // devices,
                    'params_and_inputs_gib': memory.argument_size_in_bytes / _GIB,
                    'outputs_gib': memory.output_size_in_bytes / _GIB,
                    # outputs that reuse donated inputs' buffers (the train state)
                    'aliased_gib': memory.alias_size_in_bytes / _GIB,
                    'temporaries_gib': memory.temp_size_in_bytes / _GIB,
                    'flops_per_device': step_flops(name, config, placement, lowered)})
  return reports


def step_flops(name: str, config: ml_collections.ConfigDict, placement: parallel.Placement,
               lowered: jax.stages.Lowered | None = None) -> float:
  """FLOPs of one step of training stage `name` (or 'evaluate': one eval forward) per
  device, XLA's count on the lowered program (`lowered`, if given) with its loops unrolled."""
  unrolled = _unrolled(name, config)
  if unrolled or lowered is None:
    lowered = _lower(name, unrolled or config, placement)[0]
  return lowered.cost_analysis()['flops'] / placement.mesh.size


def target_backend(config: ml_collections.ConfigDict) -> str:
  """The backend the dry-run program is for: fake devices stand in for a pod's
  accelerators, otherwise it is this machine's."""
  return 'accelerator' if config.dry_run_devices else jax.default_backend()


def for_target(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with model.dtype and model.attention 'auto' resolved for `target_backend`,
  so that the program compiled and costed is the one the run will execute."""
  config = config.copy_and_resolve_references()
  config.model.update(vit.compute_settings(config.model, target_backend(config)))
  return config


def table(reports: list[dict], mesh, config: ml_collections.ConfigDict) -> str:
  """The dry run's printed report: one Markdown row per compiled step of `compile_steps`."""
  lines = [f'Dry run on {jax.device_count()} {jax.devices()[0].platform} devices, mesh '
           f'{dict(mesh.shape)}; memory (XLA\'s compiled program) and FLOPs per device',
           f'Compute: {config.model.dtype}, {config.model.attention} attention (\'auto\' '
           f'resolved for {target_backend(config)})',
           '| step | batch/device | params+inputs GiB | outputs GiB | temporaries GiB | '
           'GFLOPs/step |', '|---|---:|---:|---:|---:|---:|']
  for r in reports:
    lines.append(f'| {r["what"]} | {r["batch_per_device"]} | {r["params_and_inputs_gib"]:.3f} '
                 f'| {r["outputs_gib"]:.3f} | {r["temporaries_gib"]:.3f} '
                 f'| {r["flops_per_device"] / 1e9:.1f} |')
  return '\n'.join(lines)

"""Device mesh, shardings of params and batches, global batches, multi-process start-up.

The mesh's axis names say how work is split (`config.mesh`, a tuple of (name, size)):

  'data'  data parallel: the batch is split over it, params are replicated along it.
  'fsdp'  ZeRO-3 / FSDP: the batch is split over it too, and each param (and its optimizer
          moments) of FSDP_MIN_SIZE elements or more is split along its largest dim that
          divides over it; XLA gathers a param where a layer uses it.

So (('data', -1),) is pure data parallel, (('fsdp', -1),) pure FSDP and (('data', 4),
('fsdp', 2)) both. A param with no dim divisible by the 'fsdp' size stays replicated.

`config.sharding_rules` overrides that policy per param: (regex, spec) pairs, first match
wins, e.g. (('pos_embedding', ()), ('fc[12]/kernel', (None, 'fsdp'))); a spec has an
axis name (or None, or a tuple of names) per dim, () is replicated.

Evaluation gathers features, logits and labels once, to every process, after the last batch
(`extraction.extract`): the scorers fit on a whole set (a feature bank, class statistics).
"""

import dataclasses
import importlib.util
import math
import os
import re
import threading

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mood_jax.errors import UserError
from mood_jax.exit_now import exit_now

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# Smaller params (biases, norms, small embeddings) stay replicated: gathering them would
# cost a collective per layer to save a few KiB. 4096 elements is a 64x64 kernel.
FSDP_MIN_SIZE = 2**12


def make_mesh(axes) -> Mesh:
  """Mesh from config: (name, size) pairs with at most one size of -1 (the rest)."""
  names = tuple(name for name, _ in axes)
  unknown = set(names) - {DATA_AXIS, FSDP_AXIS}
  if unknown or len(set(names)) != len(names):
    raise UserError(f'mesh {tuple(axes)}: name each of the axes "{DATA_AXIS}" and '
                    f'"{FSDP_AXIS}" at most once ({sorted(unknown) or "a repeated name"})')
  sizes = [size for _, size in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or jax.device_count() % known:
    raise UserError(f'mesh {tuple(axes)} does not fit {jax.device_count()} devices: '
                    'give sizes whose product divides the device count, with at most one -1')
  sizes = [jax.device_count() // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != jax.device_count():
    raise UserError(f'mesh sizes {sizes} use {int(np.prod(sizes))} of {jax.device_count()} devices')
  # Auto axes: shardings come from jit's in/out_shardings, not from array types.
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Every axis splits the batch: FSDP devices each see their own examples too."""
  return tuple(name for name in (DATA_AXIS, FSDP_AXIS) if name in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[n, batch, ...]: a stack of batches (gradient accumulation), each split as one batch."""
  return NamedSharding(mesh, P(None, batch_axes(mesh)))


def _spec_by_shape(shape: tuple[int, ...], mesh: Mesh) -> P:
  """The largest dim divisible by the 'fsdp' size split over it, for large params."""
  fsdp_size = dict(mesh.shape).get(FSDP_AXIS, 1)
  if fsdp_size == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  divisible = [dim for dim, size in enumerate(shape) if size % fsdp_size == 0]
  if not divisible:
    return P()
  split = max(divisible, key=lambda dim: shape[dim])
  return P(*(FSDP_AXIS if dim == split else None for dim in range(len(shape))))


def _axes(entry) -> tuple[str, ...]:
  """The mesh axes one dim of a spec names: None, a name, or a tuple of names."""
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _spec_by_rule(path: str, shape: tuple[int, ...], mesh: Mesh, pattern: str, spec) -> P:
  """`spec` for a param the rule `pattern` matched, if it fits the param and the mesh."""
  unknown = {name for entry in spec for name in _axes(entry)} - set(mesh.axis_names)
  if len(spec) > len(shape):
    problem = 'has more entries than the param has dims'
  elif unknown:
    problem = f'names axes {sorted(unknown)} that the mesh lacks'
  elif any(size % math.prod(mesh.shape[name] for name in _axes(entry))
           for size, entry in zip(shape, spec)):
    problem = "splits a dim that does not divide by its axes' size"
  else:
    return P(*spec)
  raise UserError(f'sharding rule ({pattern!r}, {tuple(spec)}) {problem}: {path} has shape '
                  f'{shape} on mesh {dict(mesh.shape)}; fix or narrow the rule')


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules=()) -> P:
  """The spec of the first of `rules` whose regex matches the end of `path` (at a '/'),
  else the 'fsdp' policy by shape (see the module docstring)."""
  for pattern, spec in rules:
    if re.search(f'(?:^|/)(?:{pattern})$', path):
      return _spec_by_rule(path, shape, mesh, pattern, spec)
  return _spec_by_shape(shape, mesh)


def state_shardings(abstract_tree, mesh: Mesh, rules=()):
  """Shardings of params or a whole train state.

  A rule's regex matches the end of a leaf's '/'-joined path, so 'fc1/kernel' places a
  param and its optimizer moments alike (their paths end as the param's does). Without a
  matching rule, placement goes by shape, which also splits moments as their params;
  counters are scalars, replicated.
  """
  def sharding(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    return NamedSharding(mesh, param_spec(name, leaf.shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(sharding, abstract_tree)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where arrays live: the device mesh and `config.sharding_rules`, read once and passed
  down to whatever places params or batches."""
  mesh: Mesh
  rules: tuple = ()

  @classmethod
  def from_config(cls, config) -> 'Placement':
    return cls(make_mesh(config.mesh), tuple(config.sharding_rules))

  def shardings(self, abstract_tree):
    """`state_shardings` of params or a whole train state under these rules."""
    return state_shardings(abstract_tree, self.mesh, self.rules)

  def placed(self, shapes):
    """`shapes` (ShapeDtypeStructs) with the shardings they get here."""
    return jax.tree.map(lambda s, sharding: s.update(sharding=sharding), shapes,
                        self.shardings(shapes))

  def create(self, init):
    """`init()`'s pytree, created where it lives (split over 'fsdp' if so): never whole on
    one device first."""
    return jax.jit(init, out_shardings=self.shardings(jax.eval_shape(init)))()


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str) -> None:
  axes = batch_axes(mesh)
  devices = math.prod(mesh.shape[name] for name in axes)
  if global_batch_size % devices:
    raise UserError(f'{what}={global_batch_size} does not divide over the {devices} devices '
                    f'of the batch mesh axes {dict((a, mesh.shape[a]) for a in axes)}: '
                    f'use a multiple of {devices}')


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assemble each process's numpy shard into one global jax.Array per field."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def _launched_as_one_of_many() -> bool:
  """A launcher that JAX's own cluster detection reads started several processes: srun,
  mpirun, or a Cloud TPU VM (libtpu installed; one host of a slice or a single host)."""
  return (int(os.environ.get('SLURM_NTASKS', 1)) > 1
          or int(os.environ.get('OMPI_COMM_WORLD_SIZE', 1)) > 1
          or importlib.util.find_spec('libtpu') is not None)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           join_timeout_s: float = 300, peer_timeout_s: float = 30) -> None:
  """Joins a multi-process run; call before anything else uses JAX.

  Explicit arguments for any launcher; SLURM, Open MPI and Cloud TPU VMs need none. A plain
  single process does not initialize anything. A process that cannot join within
  `join_timeout_s` (the coordinator unreachable, a process missing) ends with one line naming
  the address; JAX's own wait, and its heartbeat timeout, are set longer, as backstops to
  ours (exit_now's line, peer_watch's), since both end in a C++ abort.
  """
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if not (explicit or _launched_as_one_of_many()):
    return
  address = coordinator_address or 'the address JAX read from the cluster environment'
  which = f' (process {process_id} of {num_processes})' if process_id is not None else ''
  timer = threading.Timer(join_timeout_s, exit_now, (
      f'error: could not join the run at coordinator {address} within {join_timeout_s:g}s'
      f'{which}: start every process with the same '
      '--coordinator_address (process 0\'s host:port, reachable from every host) and check '
      'the network; --config.coordinator_timeout_s sets the wait', 1))
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(join_timeout_s) + 60,
                               heartbeat_timeout_seconds=int(2 * peer_timeout_s) + 10)
  finally:
    timer.cancel()

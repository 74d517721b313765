"""Device mesh, shardings, and global batches built from process-local data."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mood_jax.errors import UserError

DATA_AXIS = 'data'


def make_mesh(axes) -> Mesh:
  """Mesh from config: a list of (name, size) with at most one size of -1 (the rest)."""
  names = tuple(name for name, _ in axes)
  sizes = [size for _, size in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or jax.device_count() % known:
    raise UserError(f'mesh {list(axes)} does not fit {jax.device_count()} devices: '
                     'give sizes whose product divides the device count, with at most one -1')
  sizes = [jax.device_count() // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != jax.device_count():
    raise UserError(f'mesh sizes {sizes} use {int(np.prod(sizes))} of {jax.device_count()} devices')
  # Auto axes: shardings come from jit's in/out_shardings, not from array types.
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str) -> None:
  data_size = mesh.shape[DATA_AXIS]
  if global_batch_size % data_size:
    raise UserError(f'{what}={global_batch_size} does not divide over the {data_size} devices '
                     f'of the "{DATA_AXIS}" mesh axis: use a multiple of {data_size}')


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assemble each process's numpy shard into one global jax.Array per field."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)

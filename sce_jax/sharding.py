"""The device mesh, and arrays between the hosts and the mesh.

One data-parallel axis, `DATA`: batches are split over it and the state is replicated, so
everything written for the global batch outside `jax.shard_map` sees global-batch statistics
(synchronised BatchNorm, docs/SCE.md section 3). Each process feeds its own share of a batch.
"""
import collections

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None):
  """A 1-D data-parallel mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def rows(mesh):
  """Split along the leading (batch) axis over the devices."""
  return NamedSharding(mesh, P(DATA))


def to_host(x):
  """A global array as one NumPy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def put(x, sharding):
  """A host array (the same on every process) as a global array with `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_global(batches, sharding, ahead=2):
  """Global arrays from per-process NumPy batches, `ahead` transfers in flight. Closing it
  closes the host iterator (grain's worker processes)."""
  queue = collections.deque()
  try:
    for batch in batches:
      queue.append(jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), batch))
      if len(queue) > ahead:
        yield queue.popleft()
    yield from queue
  finally:
    if hasattr(batches, "close"):
      batches.close()

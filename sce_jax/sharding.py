"""The device mesh, and arrays between the hosts and the mesh.

One data-parallel axis, `DATA`: batches are split over it, so everything written for the global
batch outside `jax.shard_map` sees global-batch statistics (synchronised BatchNorm, docs/SCE.md
section 3). Each process feeds its own share of a batch. The state is replicated, or with
sharding.params='fsdp' its parameters and optimiser state are split over `DATA` too (`fsdp`,
docs/SCE.md 11).
"""
import collections
import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = "data"
# sharding.params: every device holds the whole state, or the parameters, target parameters and
# optimiser state are split over DATA (`fsdp`).
PARAMS = ("replicate", "fsdp")


def make_mesh(devices=None):
  """A 1-D data-parallel mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def fsdp(tree, mesh, min_bytes):
  """NamedShardings of `tree`'s arrays (or ShapeDtypeStructs) by big_vision's `fsdp` rule
  (big_vision/sharding.py): each array split over DATA along its largest dimension that the
  axis divides (of equal ones, the last), arrays of at most `min_bytes` (and those no dimension
  of which divides) replicated. Inside a jitted step XLA's SPMD partitioner then gathers each
  layer's weights where they are used and sums each device's share of their gradients (FSDP,
  ZeRO-3)."""
  size = mesh.shape[DATA]

  def one(x):
    dims = sorted(range(x.ndim), key=lambda i: (x.shape[i], i), reverse=True)
    if math.prod(x.shape) * x.dtype.itemsize > min_bytes:
      for i in dims:
        if x.shape[i] % size == 0:
          return NamedSharding(mesh, P(*[None] * i, DATA))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


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

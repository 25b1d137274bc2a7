"""The training set on the accelerator (data.on_device): no host work per step.

For sets that fit in accelerator memory (CIFAR, STL-10, Tiny ImageNet) the decoded uint8 train
set is put on the mesh once, replicated, so that every device gathers its share of a batch from
its own copy without communication (sharded over `data`, each step would move the batch's
images between devices; CIFAR-10 is 150 MB against tens of GB per accelerator). Batches follow
the host path's rules: each epoch is a permutation of the set drawn from (seed, epoch), batches
run on across epoch boundaries, so every image is seen exactly once per epoch; the indices of
step s depend only on (seed, s), so a resumed run reads what an uninterrupted one does and the
device count changes nothing. Inside the jitted step (`prepare`) each view is cropped by
torchvision's RandomResizedCrop rule with Pillow's antialiased bilinear resize, then flipped and
coloured (`augment.crop_and_augment`), one key per image of the global batch (docs/SCE.md
section 6).

Square images are held flat, (N, H * W * 3): a TPU tiles an array's two minor dimensions, and
(N, 32, 32, 3) uint8 has a minor dimension of 3, so XLA copied the whole CIFAR set into a
padded layout in every step (614 MB of the step's 0.89 GiB on v5e, benchmarks/RESULTS.md);
rows of 3072 bytes are gathered as they lie.
"""
import functools
import itertools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sce_jax import sharding
from sce_jax.data import augment
from sce_jax.data import sources
from sce_jax.data.images import DataError, UndecodableImage, decode, decode_into

# The data set may take this share of a device's memory; the rest is the model's and the step's.
MEMORY_FRACTION = 0.25


class Resident(NamedTuple):
  """A training set on the mesh, replicated."""
  images: jax.Array  # (N, H * W * 3) uint8 of square images (`flat`), else (N, H, W, 3)
  labels: jax.Array  # (N,) int32

  @property
  def num_examples(self):
    return self.labels.shape[0]


def device_memory(device) -> int:
  """Bytes a device can hold: the runtime's limit (GPU, TPU), else (CPU) the host's memory
  shared by its local devices."""
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"]
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def _host_arrays(source, shape):
  """(images, labels) of `source` as NumPy arrays; decoded arrays are used as they are."""
  images = getattr(source, "images", None)
  if isinstance(images, np.ndarray) and images.shape[1:] == shape and images.dtype == np.uint8:
    return np.asarray(images), np.asarray(source.labels, np.int32)
  images = np.empty((source.num_examples, *shape), np.uint8)
  labels = np.empty(source.num_examples, np.int32)
  decode_into(images, source, labels)
  return images, labels


def load(source, mesh):
  """`source` (a `sources` object) replicated on `mesh`, or None, with a log line saying why,
  when it takes more than MEMORY_FRACTION of a device's memory, or its images differ in size or
  do not all decode (the host path skips those, pipeline.py): the run then reads it on the
  host. A `sources.Mixture` is read on the host (its loader mixes it)."""
  if isinstance(source, sources.Mixture):
    logging.info("data.on_device: a data.mixture is read on the host.")
    return None
  try:
    shape = np.asarray(decode(source[0])).shape
    need = source.num_examples * int(np.prod(shape))
    budget = int(MEMORY_FRACTION * min(device_memory(d) for d in mesh.local_devices))
    if need > budget:
      logging.warning("data.on_device: the train set (%.2f GB) needs more than %d%% of a "
                      "device's memory (%.2f GB); reading it on the host instead.", need / 1e9,
                      MEMORY_FRACTION * 100, budget / MEMORY_FRACTION / 1e9)
      return None
    images, labels = _host_arrays(source, shape)
  except (DataError, UndecodableImage) as e:
    logging.warning("data.on_device needs images of one size that all decode (%s); reading "
                    "the set on the host instead.", e)
    return None
  replicated = sharding.replicated(mesh)
  logging.vlog(1, "data.on_device: %d train images of %s (%.2f GB) on each device.",
               len(labels), shape, need / 1e9)
  return Resident(sharding.put(flat(images), replicated), sharding.put(labels, replicated))


def flat(images):
  """(N, H, W, 3) images as `Resident` holds them: rows of H * W * 3 when H == W."""
  n, h, w, _ = images.shape
  return images.reshape(n, -1) if h == w else images


def batch_indices(epoch, offset, *, seed, num_examples, batch_size):
  """Global indices of the batch that starts at `offset` of epoch `epoch`'s permutation; one
  that passes the epoch's end goes on with the next epoch's permutation."""
  key = jax.random.key(seed)
  order = lambda e: jax.random.permutation(jax.random.fold_in(key, e), num_examples)
  return jnp.concatenate([order(epoch), order(epoch + 1)])[offset + jnp.arange(batch_size)]


def train_batches(resident, *, global_batch_size, seed, start_step, mesh):
  """The step inputs {'index': (B,) int32 over `data`, 'images', 'labels': the resident set}
  of steps start_step, start_step + 1, ... (forever): what `prepare` reads."""
  n = resident.num_examples
  if global_batch_size > n:
    raise DataError(f"batch_size={global_batch_size} is larger than the {n} training "
                    f"images; set --config.batch_size to at most {n}.")
  indices = jax.jit(functools.partial(batch_indices, seed=seed, num_examples=n,
                                      batch_size=global_batch_size),
                    out_shardings=sharding.rows(mesh))
  for step in itertools.count(start_step):
    epoch, offset = divmod(step * global_batch_size, n)
    yield {"index": indices(epoch, offset), "images": resident.images,
           "labels": resident.labels}


def batch_sharding(mesh):
  """How the step receives `train_batches`: the indices split over `data`, the set replicated."""
  replicated = sharding.replicated(mesh)
  return {"index": sharding.rows(mesh), "images": replicated, "labels": replicated}


def prepare(key, batch, *, specs, mean, std):
  """The step's input stage: the batch's images gathered from the resident set, then
  `augment.crop_and_augment` (one random resized crop per view of `specs`, flips, colours).
  Returns {'views': normalised float views, 'label'}."""
  images, labels = batch["images"][batch["index"]], batch["labels"][batch["index"]]
  if images.ndim == 2:  # flat square images (`flat`)
    side = math.isqrt(images.shape[1] // 3)
    images = images.reshape(-1, side, side, 3)
  return augment.crop_and_augment(key, {"image": images, "label": labels}, specs, mean, std)

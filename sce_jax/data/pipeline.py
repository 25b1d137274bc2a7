"""The trainer's entry points to the input pipeline (docs/SCE.md sections 6 and 7).

The host stage (tf.data or grain) decodes and crops a source (`sources.Splits`); the
accelerator stage (`augment`) does the rest. Batches come out as global jax.Arrays sharded over
the mesh's 'data' axis, each process contributing its own share.

data_cfg keys read here and by the host stages:
  image_size: evaluation crop size.
  loader: one of LOADERS.
  shuffle_buffer: tf.data shuffle window over TFDS records (folders and cached data are fully
    shuffled).
  num_workers: grain worker processes (0 = `prefetch` threads of this process).
  prefetch: host batches prepared ahead.
  cache: keep decoded images in host memory (CIFAR-size sets).

Nothing here imports TensorFlow unless the tf.data loader is chosen.
"""
import jax

from sce_jax import sharding as sharding_lib
from sce_jax.data import sources

# 'auto': tf.data where TensorFlow is installed and the source is on disk, else grain.
LOADERS = ("auto", "tf", "grain")


def _host_stage(source, loader):
  """The host pipeline module for `source` under data.loader."""
  if loader == "auto" and not isinstance(source, sources.InMemory):
    try:
      from sce_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
      return tf_pipeline
    except ImportError:
      pass  # No TensorFlow: grain.
  if loader == "tf":
    from sce_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
    return tf_pipeline
  from sce_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
  return grain_pipeline


def _local_batch(global_batch_size):
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch {global_batch_size} does not split over "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def train_iterator(source, data_cfg, *, global_batch_size, views, seed, start_step=0,
                   sharding):
  """Infinite training batches {'views': tuple of uint8 (B, s_v, s_v, 3), 'label': int32 (B,)}.

  One random resized crop per ViewSpec in `views` (size, scale, ratio; no flip or colour).
  Reshuffled every epoch; deterministic for (seed, process); started at `start_step` it yields
  what the uninterrupted stream yields from that step on.
  """
  batches = _host_stage(source, data_cfg.loader).train_batches(
      source, data_cfg, views=tuple(views), batch_size=_local_batch(global_batch_size),
      seed=seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  return sharding_lib.to_global(batches, sharding)


def eval_iterator(source, data_cfg, *, global_batch_size, sharding):
  """One pass over `source`: {'image': uint8 (B, S, S, 3), 'label': int32, 'mask': bool}.

  S = data_cfg.image_size: `crop.eval_geometry` (resize and centre crop for ImageNet-size sets,
  the plain image for small ones). The last batches are padded with mask False; every example
  counts exactly once over all processes and devices.
  """
  batches = _host_stage(source, data_cfg.loader).eval_batches(
      source, data_cfg, batch_size=_local_batch(global_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())
  return sharding_lib.to_global(batches, sharding)

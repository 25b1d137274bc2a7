"""The trainer's entry points to the input pipeline (spec sections 6 and 7).

The host stage (tf.data or grain) decodes and crops; the accelerator stage (`augment`) does the
rest. Batches come out as global jax.Arrays sharded over the mesh's 'data' axis, each process
contributing its own share.

data_cfg keys (an ml_collections.ConfigDict or anything with these attributes):
  source: 'folder' | 'tfds' | 'memory'.
  name: TFDS name ('cifar10', 'imagenet2012', 'stl10', ...), for source='tfds'.
  path: class-folder tree, folder with split subfolders, or .tar/.tar.gz of one ('folder').
  eval_path: where the evaluation split lives; '' = found next to `path`.
  data_dir: TFDS data_dir (None = TFDS default).
  train_split, eval_split: split names ('train' / 'test'; 'unlabelled' for STL-10).
  image_size: evaluation crop size.
  loader: 'auto' (tf.data when TensorFlow imports and source != 'memory', else grain),
    'tf' or 'grain'.
  shuffle_buffer: tf.data shuffle window over TFDS records (folders and cached data are fully
    shuffled).
  num_workers: grain worker processes (0 = `prefetch` threads of this process).
  prefetch: host batches prepared ahead.
  cache: keep decoded images in host memory (CIFAR-size sets).
  arrays: for source='memory', {split: (uint8 images (N, H, W, 3), int labels (N,))}.

Nothing here imports TensorFlow unless the tf.data loader is chosen.
"""
import collections
import importlib

import jax

from sce_jax.data import sources


def _loader(data_cfg):
  """The host pipeline module (tf_pipeline or grain_pipeline) for data_cfg.loader."""
  if data_cfg.source == "tfds":
    sources.import_tfds()  # A clear error when TensorFlow Datasets is missing.
  if data_cfg.loader == "auto" and data_cfg.source != "memory":
    try:
      return importlib.import_module("sce_jax.data.tf_pipeline")
    except ImportError:
      pass  # No TensorFlow: grain.
  loader = "grain" if data_cfg.loader == "auto" else data_cfg.loader
  if loader not in ("tf", "grain"):
    raise ValueError(f"unknown loader {loader!r}; use 'auto', 'tf' or 'grain'")
  return importlib.import_module(f"sce_jax.data.{loader}_pipeline")


def _local_batch(global_batch_size):
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch {global_batch_size} does not split over "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def _to_global(batches, sharding, ahead=2):
  """Global arrays from per-process numpy batches, `ahead` transfers in flight. Closing it
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


def train_iterator(data_cfg, *, global_batch_size, views, seed, start_step=0, sharding):
  """Infinite training batches {'views': tuple of uint8 (B, s_v, s_v, 3), 'label': int32 (B,)}.

  One random resized crop per ViewSpec in `views` (size, scale, ratio; no flip or colour).
  Reshuffled every epoch; deterministic for (seed, process); started at `start_step` it yields
  what the uninterrupted stream yields from that step on.
  """
  batches = _loader(data_cfg).train_batches(
      data_cfg, views=tuple(views), batch_size=_local_batch(global_batch_size), seed=seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  return _to_global(batches, sharding)


def eval_iterator(data_cfg, split, *, global_batch_size, sharding):
  """One pass over `split`: {'image': uint8 (B, S, S, 3), 'label': int32, 'mask': bool}.

  S = data_cfg.image_size: resize the shorter side to S * 256/224 and centre crop for
  ImageNet-size sets (S >= 128), no resize for small sets at native size. The last batches are
  padded with mask False; every example counts exactly once over all processes and devices.
  """
  batches = _loader(data_cfg).eval_batches(
      data_cfg, split, batch_size=_local_batch(global_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())
  return _to_global(batches, sharding)


def num_examples(data_cfg, split):
  source = sources.from_config(data_cfg, split)
  if isinstance(source, sources.Tfds):
    return source.builder.info.splits[split].num_examples
  return len(source)


def num_classes(data_cfg):
  source = sources.from_config(data_cfg, data_cfg.train_split)
  if isinstance(source, sources.Tfds):
    return source.builder.info.features["label"].num_classes
  if isinstance(source, sources.ImageFolder):
    return len(source.classes)
  return int(source.labels.max()) + 1

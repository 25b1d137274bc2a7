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
  host_stage: one of crop.HOST_STAGES: 'crops' (the host crops, batches of uint8 views) or
    'decode' (the host decodes into a decode_size buffer, batches {'image', 'full', 'factor',
    'label'}; the step crops, `augment.crop_and_augment`).
  decode_size: the side of host_stage=decode's square buffer.
  strict: an undecodable image stops the run (DataError) instead of being skipped.

An image that cannot be decoded (corrupt, truncated, empty) is skipped, the same way on both
host stages: they stand a black pixel in for it and name its file in the batch's 'skipped'
strings; here each file is named in a warning (the first SKIPPED_NAMED of them) and, in
training, its row takes a copy of the next good row of the batch, so batches keep their size
and stay a function of (seed, process, step), which exact resuming needs; in evaluation its row
is masked out.

Nothing here imports TensorFlow unless the tf.data loader is chosen.
"""
import math

import jax
import numpy as np
from absl import logging

from sce_jax import sharding as sharding_lib
from sce_jax.data import images, sources

SKIPPED_NAMED = 10  # Undecodable files named one by one; after them, counts at 100, 1000, ...

# 'auto': tf.data where TensorFlow is installed and the source is on disk, else grain.
LOADERS = ("auto", "tf", "grain")


def _host_stage(source, loader):
  """The host pipeline module for `source` (or its mixture's parts) under data.loader."""
  parts = source.parts if isinstance(source, sources.Mixture) else (source,)
  if loader == "auto" and not any(isinstance(p, sources.InMemory) for p in parts):
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


class _Skipped:
  """The undecodable files one iterator has met: warned about, counted, or an error."""

  def __init__(self, strict, instead):
    self.strict, self.instead, self.seen = strict, instead, set()

  def report(self, names):
    for name in names:
      if self.strict:
        raise images.DataError(
            f"cannot decode image {name}; replace or remove it, or set "
            "--config.data.strict=False to skip undecodable images.")
      if name in self.seen:  # Met again in a later epoch.
        continue
      self.seen.add(name)
      count = len(self.seen)
      if count <= SKIPPED_NAMED:
        logging.warning("Skipped undecodable image %s (%d so far; %s; data.strict=True stops "
                        "instead).", name, count, self.instead)
      elif math.log10(count).is_integer():
        logging.warning("Skipped %d undecodable images so far (only the first %d are named).",
                        count, SKIPPED_NAMED)


def _fill(batch, bad):
  """The batch with each row in `bad` replaced by the next good row (cyclically)."""
  good = np.flatnonzero(~bad)
  if not good.size:
    raise images.DataError("every image of a batch is undecodable; check data.path.")
  rows = np.arange(len(bad))
  rows[bad] = good[np.searchsorted(good, rows[bad]) % good.size]
  return jax.tree.map(lambda x: x[rows], batch)


def _skip_undecodable(batches, strict, train):
  """Host batches without their 'skipped' names, reported (`_Skipped`); in training, the rows
  of the undecodable images hold copies of other rows (evaluation masks them already)."""
  skipped = _Skipped(strict, "another image of its batch stands in for it" if train
                     else "left out of the evaluation")
  try:
    for batch in batches:
      names = [n.decode() if isinstance(n, bytes) else str(n) for n in batch.pop("skipped")]
      bad = np.array([bool(n) for n in names])
      if bad.any():
        skipped.report(n for n in names if n)
        if train:
          batch = _fill(batch, bad)
      yield batch
  finally:
    if hasattr(batches, "close"):  # Stops the host stage (grain's worker processes).
      batches.close()


def _unlabelled(batches):
  """The batches with labels 0: an unlabelled mixture's sources' own labels mean nothing."""
  try:
    for batch in batches:
      yield {**batch, "label": np.zeros_like(batch["label"])}
  finally:
    batches.close()


def train_iterator(source, data_cfg, *, global_batch_size, views, seed, start_step=0,
                   sharding):
  """Infinite training batches {'views': tuple of uint8 (B, s_v, s_v, 3), 'label': int32 (B,)}.

  One random resized crop per ViewSpec in `views` (size, scale, ratio; no flip or colour); with
  data_cfg.host_stage='decode' the decoded images instead, {'image': uint8 (B, S, S, 3), 'full':
  int32 (B, 2), 'factor': int32 (B,), 'label'}, for the step to crop.
  Reshuffled every epoch; deterministic for (seed, process); started at `start_step` it yields
  what the uninterrupted stream yields from that step on. A `sources.Mixture` is drawn by the
  loader's mixing; unlabelled, its labels are 0.
  """
  batches = _host_stage(source, data_cfg.loader).train_batches(
      source, data_cfg, views=tuple(views), batch_size=_local_batch(global_batch_size),
      seed=seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  batches = _skip_undecodable(batches, data_cfg.strict, train=True)
  if isinstance(source, sources.Mixture) and not source.num_classes:
    batches = _unlabelled(batches)
  return sharding_lib.to_global(batches, sharding)


def eval_iterator(source, data_cfg, *, global_batch_size, sharding):
  """One pass over `source`: {'image': uint8 (B, S, S, 3), 'label': int32, 'mask': bool}.

  S = data_cfg.image_size: `crop.eval_geometry` (resize and centre crop for ImageNet-size sets,
  the plain image for small ones). The last batches are padded with mask False; every example
  counts exactly once over all processes and devices, and every process yields as many batches
  as the one with the largest share.
  """
  local_batch, processes = _local_batch(global_batch_size), jax.process_count()
  batches = _host_stage(source, data_cfg.loader).eval_batches(
      source, data_cfg, batch_size=local_batch,
      num_batches=math.ceil(math.ceil(source.num_examples / processes) / local_batch),
      process_index=jax.process_index(), process_count=processes)
  return sharding_lib.to_global(_skip_undecodable(batches, data_cfg.strict, train=False),
                                sharding)

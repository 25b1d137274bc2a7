"""Host stage on grain, without TensorFlow (docs/SCE.md 6 CPU stage, 7 evaluation).

Pillow decodes; crops follow torchvision's RandomResizedCrop rule (`crop.crop_window`) with
PIL's bilinear resize, as the reference's PIL pipeline. Windows are drawn on the full-resolution
image from its header; when every window is at least 2x (4x, 8x) its output size, libjpeg decodes
at 1/2 (1/4, 1/8) scale and the windows are mapped onto the smaller image. Each crop is resized
straight from the decoded image (PIL's `box`), with no intermediate copy. An undecodable image
comes out as crops of a black pixel, named in 'skipped' for pipeline.py to skip.

With data_cfg.host_stage='decode' the host only decodes (`decode_reduced`: at the DCT scale
`crop.reduction` gives, reduced to fit data_cfg.decode_size) and the step crops.

Everything is a grain MapDataset indexed by position in the infinite stream, so a batch depends
only on (seed, process, step): resuming at `start_step` is slicing, and the number of worker
processes does not change the batches. Records are grouped into batches first and a batch is
cropped in one call, straight into its arrays, with the crops of the example at stream position
p drawn from `crop_rng(seed, process, p)`: a per-example map and stacking cost ~10 % more CPU
(benchmarks/RESULTS.md, Input pipeline).
"""
import functools
import math
import os
import types

from absl import flags
import grain
import numpy as np
from PIL import Image

from sce_jax.data import crop
from sce_jax.data import images
from sce_jax.data import sources


def _windows(u, height, width, views):
  """(top, left, h, w) of each view's crop from uniforms u (len(views), ATTEMPTS, 4), as
  torchvision's RandomResizedCrop draws them (`crop.crop_window`) one view after the other;
  views that share (scale, ratio) are drawn in one vectorised call."""
  windows = [None] * len(views)
  groups = {}
  for i, v in enumerate(views):
    groups.setdefault((tuple(v.scale), tuple(v.ratio)), []).append(i)
  for (scale, ratio), index in groups.items():
    drawn = crop.crop_window(u[index], height, width, scale, ratio)
    for j, i in enumerate(index):
      windows[i] = tuple(int(a[j]) for a in drawn)
  return windows


def _draft_scale(windows, views):
  """The largest JPEG decode scale (1, 2, 4, 8) that leaves every window at least as large as
  its output, so each crop is still a bilinear downscale (or a copy) of decoded pixels."""
  fit = min(min(h, w) // v.size for (_, _, h, w), v in zip(windows, views))
  return next((s for s in (8, 4, 2) if fit >= s), 1)


_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # crop.INTERPOLATIONS


def center_crop(image: Image.Image, image_size, resize=0, interpolation="bilinear"
                ) -> np.ndarray:
  """Evaluation crop: resize the shorter side (`crop.eval_resize`), centre crop image_size."""
  (h, w), (top, left) = crop.eval_geometry(image.height, image.width, image_size, resize)
  if (h, w) != (image.height, image.width):
    image = image.resize((w, h), _FILTERS[interpolation])
  return np.asarray(image.crop((left, top, left + image_size, top + image_size)))


def crop_rng(seed, process_index, position) -> np.random.Generator:
  """The random stream of the crops of the example at `position` of a process's training
  stream."""
  return np.random.default_rng([seed, process_index, position])


def crop_views(record, rng, views) -> tuple[tuple[np.ndarray, ...], str]:
  """(one random resized crop per view from one decode, '' or the name of an undecodable
  image): torchvision's RandomResizedCrop windows of the full-resolution image (`_windows`),
  view after view."""
  u = rng.random((len(views), crop.ATTEMPTS, 4))
  full = {}

  def draft(width, height):  # Called with the JPEG header's size, before decoding.
    full["size"], full["windows"] = (width, height), _windows(u, height, width, views)
    s = _draft_scale(full["windows"], views)
    return (width // s, height // s) if s > 1 else None

  image, skipped = images.decode_or_placeholder(record, draft)
  if skipped or "windows" not in full:  # The placeholder, or an already-decoded array.
    full["size"], full["windows"] = image.size, _windows(u, image.height, image.width, views)
  s = round(full["size"][0] / image.width)  # 1, or the decode scale: image is ceil(size / s).
  out = []
  for (top, left, h, w), v in zip(full["windows"], views):
    box = (left, top, left + w, top + h) if s == 1 else (
        left / s, top / s, (left + w) / s, (top + h) / s)
    out.append(np.asarray(image.resize((v.size, v.size), Image.BILINEAR, box=box)))
  return tuple(out), skipped


def _train_batch(step, records, *, views, seed, process_index):
  """Batch `step`: each record's `crop_views` copied into one uint8 (B, s, s, 3) array a view,
  and the names of the undecodable images among them ('' for the others)."""
  batch = tuple(np.empty((len(records), v.size, v.size, 3), np.uint8) for v in views)
  skipped = []
  for i, record in enumerate(records):
    rng = crop_rng(seed, process_index, step * len(records) + i)
    crops, name = crop_views(record, rng, views)
    for out, view in zip(batch, crops):
      out[i] = view
    skipped.append(name)
  return {"views": batch, "label": np.array([r["label"] for r in records], np.int32),
          "skipped": np.array(skipped)}


# `crop.reduction` on Python floats: NumPy's scalar ops would cost ~10 % of a decode.
_SCALAR_OPS = types.SimpleNamespace(
    sqrt=math.sqrt, round=round, ceil=math.ceil, minimum=min, maximum=max, ones_like=lambda x: 1,
    where=lambda condition, x, y: x if condition else y)


def decode_reduced(record, views, buffer) -> tuple[Image.Image, tuple[int, int], int, str]:
  """host_stage=decode: (the image decoded at its DCT scale and reduced by its integer factor,
  `crop.reduction`; its full (height, width); the total factor; '' or the name of an
  undecodable image)."""
  full = {}

  def draft(width, height):  # Called with the JPEG header's size, before decoding.
    full["size"] = (height, width)
    s = int(crop.reduction(height, width, views, buffer, xp=_SCALAR_OPS)[0])
    return (width // s, height // s) if s > 1 else None

  image, skipped = images.decode_or_placeholder(record, draft)
  if skipped or "size" not in full:  # The placeholder, or a decoded array or another format.
    full["size"] = (image.height, image.width)
  height, width = full["size"]
  s = round(width / image.width)  # 1, or the decode scale: image is ceil(size / s).
  k = -(-max(image.size) // buffer)
  if k > 1:
    image = image.reduce(k)
  return image, full["size"], s * k, skipped


def _decode_batch(step, records, *, views, buffer):
  """Batch `step` for host_stage=decode: {'image': uint8 (B, buffer, buffer, 3), each record's
  `decode_reduced` image in its top-left corner on zeros, 'full': int32 (B, 2), 'factor': int32
  (B,), 'label', 'skipped'}. No randomness: the step draws the windows (exact resume)."""
  del step
  batch = np.zeros((len(records), buffer, buffer, 3), np.uint8)
  full = np.empty((len(records), 2), np.int32)
  factor = np.empty(len(records), np.int32)
  skipped = []
  for i, record in enumerate(records):
    image, full[i], factor[i], name = decode_reduced(record, views, buffer)
    batch[i, :image.height, :image.width] = np.asarray(image)
    skipped.append(name)
  return {"image": batch, "full": full, "factor": factor,
          "label": np.array([r["label"] for r in records], np.int32), "skipped": np.array(skipped)}


def _eval_example(shard, data_cfg, i):
  """Example i of this process's share, or a masked zero example past its end (padding)."""
  size = data_cfg.image_size
  if i >= len(shard):
    return {"image": np.zeros((size, size, 3), np.uint8),
            "label": np.int32(0), "mask": False, "skipped": ""}
  record = shard[i]
  image, skipped = images.decode_or_placeholder(record)
  return {"image": center_crop(image, size, data_cfg.eval_resize, data_cfg.eval_interpolation),
          "label": np.int32(record["label"]), "mask": not skipped, "skipped": skipped}


def _decoded(record):
  image, skipped = images.decode_or_placeholder(record)
  return {"image": np.asarray(image), "label": record["label"], "skipped": skipped}


def _shard(source, data_cfg, process_index, process_count, equal):
  """This process's share of `source` (the same size on every process when `equal`),
  decoded into memory once when data_cfg.cache."""
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if equal:
    ds = ds[:len(source) // process_count]
  if data_cfg.cache:
    ds = grain.MapDataset.source(list(
        ds.map(_decoded).to_iter_dataset(grain.ReadOptions(num_threads=os.cpu_count()))))
  return ds


def _iterate(ds, data_cfg):
  """Batches computed `prefetch` at a time on threads, in `num_workers` processes if > 0."""
  parallel = max(1, data_cfg.prefetch)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=parallel, prefetch_buffer_size=parallel))
  if data_cfg.num_workers:
    if not flags.FLAGS.is_parsed():  # Grain's worker start-up reads absl flags (no app.run).
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(it)


def train_batches(source, data_cfg, *, views, batch_size, seed, start_step, process_index,
                  process_count):
  """Infinite host batches {'views': tuple of uint8 (B, s, s, 3), 'label': int32 (B,)}, or with
  data_cfg.host_stage='decode' the decoded images for the step to crop (`_decode_batch`).

  Reshuffled every epoch (grain folds the epoch into the shuffle seed); batches run across
  epoch boundaries, so none is ever short. A `sources.Mixture` is grain's mix of its parts'
  streams, each shuffled with a seed of its own, in its proportions.
  """
  def stream(part, *key):
    ds = _shard(part, data_cfg, process_index, process_count, equal=True)
    shuffle_seed = np.random.SeedSequence([seed, process_index, *key]).generate_state(1)[0]
    return ds.shuffle(int(shuffle_seed)).repeat()

  if isinstance(source, sources.Mixture):
    ds = grain.MapDataset.mix([stream(part, k) for k, part in enumerate(source.parts)],
                              source.proportions)
  else:
    ds = stream(source)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
  if data_cfg.host_stage == "decode":
    ds = ds.map_with_index(functools.partial(_decode_batch, views=views,
                                             buffer=data_cfg.decode_size))
  else:
    ds = ds.map_with_index(functools.partial(_train_batch, views=views, seed=seed,
                                             process_index=process_index))
  return _iterate(ds[start_step:], data_cfg)


def eval_batches(source, data_cfg, *, batch_size, num_batches, process_index, process_count):
  """`num_batches` host batches {'image', 'label', 'mask'} of `source`: every example of this
  process's share once, then padding (`pipeline.eval_iterator`)."""
  shard = _shard(source, data_cfg, process_index, process_count, equal=False)
  ds = grain.MapDataset.range(num_batches * batch_size).map(
      functools.partial(_eval_example, shard, data_cfg))
  return _iterate(ds.batch(batch_size), data_cfg)

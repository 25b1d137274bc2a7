"""Host stage on tf.data (docs/SCE.md section 6 CPU stage, section 7 evaluation).

Crops draw their windows by torchvision's RandomResizedCrop law (`crop.crop_window`, in TF
ops), as the grain and on-device paths do, and resize with an antialiased bilinear filter.
Randomness is stateless: the shuffle of epoch e is seeded by (seed, process, e) and the crops of
the element at stream position p by (seed, process, p), so a batch depends only on (seed,
process, step) and resuming at `start_step` skips records inside one epoch without decoding
them. Records are {'image', 'label', 'name'} (a file's path, a TFDS record's id); an
undecodable image comes out as crops of a black pixel, named in 'skipped' for pipeline.py to
skip.
"""
import functools
import types

import numpy as np
import tensorflow as tf

from sce_jax.data import crop
from sce_jax.data import images
from sce_jax.data import sources

tf.config.set_visible_devices([], "GPU")  # The accelerator belongs to JAX.
# The array functions `crop.crop_window` and `crop.reduction` call, as TF ops (tf.experimental.numpy's round needs
# NumPy behaviour switched on for the whole process).
_TF_OPS = types.SimpleNamespace(
    exp=tf.exp, sqrt=tf.sqrt, round=tf.round, floor=tf.floor, ceil=tf.math.ceil, where=tf.where,
    stack=tf.stack, cumsum=tf.cumsum, sum=tf.reduce_sum, any=tf.reduce_any, asarray=tf.cast,
    int32=tf.int32, minimum=tf.minimum, maximum=tf.maximum, ones_like=tf.ones_like)


def _past_scan_header(data):
  """Whether a JPEG goes on past the header of its first scan (an FF DA marker and the length
  of the segment it starts). libjpeg prints 'Improper call to JPEG library in state 201' or
  'Input file read error' straight to stderr for a JPEG cut short before that point, whatever
  TF's log level. (An FF DA inside an earlier table can pass for the marker: that file is then
  decoded as it would be anyway.)"""
  raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
  at = tf.cast(tf.where((raw[:-3] == 0xFF) & (raw[1:-2] == 0xDA))[:, 0], tf.int32)
  length = tf.gather(raw, at + 2) * 256 + tf.gather(raw, at + 3)
  return tf.reduce_any(at + 2 + length < tf.size(raw))


def _jpeg(data, ratio=1):
  """uint8 (H, W, 3) of a JPEG, at 1/`ratio` scale. The accurate integer IDCT, as Pillow: TF's
  default, the fast one, is ~0.75 grey levels off. A JPEG cut short in its headers (a
  truncated copy) fails an assertion instead of reaching libjpeg (`_past_scan_header`):
  skipped like any undecodable image, without libjpeg's lines on stderr."""
  whole = tf.debugging.Assert(_past_scan_header(data), ["JPEG cut short in its headers"])
  with tf.control_dependencies([whole]):
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE", ratio=ratio)


def _other(data):
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def _decode(data):
  """uint8 (H, W, 3) from encoded bytes (`_jpeg` for JPEGs)."""
  return tf.cond(tf.io.is_jpeg(data), lambda: _jpeg(data), lambda: _other(data))


def _box_reduce(image, k):
  """Pillow's Image.reduce(k): the mean of each k x k block (partial blocks at the far edges
  average the pixels they have), rounded."""
  h, w = tf.unstack(tf.shape(image)[:2])
  pad = [[0, -h % k], [0, -w % k], [0, 0]]
  blocks = lambda x: tf.reduce_sum(
      tf.reshape(tf.pad(x, pad), [(h + pad[0][1]) // k, k, (w + pad[1][1]) // k, k, -1]), [1, 3])
  mean = blocks(tf.cast(image, tf.float32)) / blocks(tf.ones([h, w, 1]))
  return tf.cast(tf.round(mean), tf.uint8)


def _reduced(image, full, buffer):
  """{'image': `image` (decoded from a full-size `full` (H, W) image, maybe at a DCT scale)
  box-reduced by the integer factor that brings it within `buffer` (`crop.reduction`), 'full',
  'factor': the two reductions' product}."""
  size = tf.shape(image)[:2]
  scale = tf.cast(tf.round(full[1] / size[1]), tf.int32)  # 1 or the DCT scale: ceil(W / s).
  k = (tf.reduce_max(size) + buffer - 1) // buffer
  image = tf.cond(k > 1, lambda: _box_reduce(image, k), lambda: image)
  return {"image": image, "full": tf.cast(full, tf.int32), "factor": scale * k}


def _decode_reduced(data, views, buffer):
  """host_stage=decode: `_reduced` of the image decoded at the DCT scale `crop.reduction`
  gives its header's size (tf.io.decode_jpeg's ratio; other formats whole)."""
  def jpeg():
    full = tf.image.extract_jpeg_shape(data)[:2]
    height, width = tf.unstack(tf.cast(full, tf.float64))
    scale, _ = crop.reduction(height, width, views, buffer, xp=_TF_OPS)
    branch = tf.cast(tf.round(tf.math.log(scale) / np.log(2)), tf.int32)  # DCT_SCALES index.
    image = tf.switch_case(branch, [functools.partial(_jpeg, data, r) for r in crop.DCT_SCALES])
    return image, full

  def other():
    image = _other(data)
    return image, tf.shape(image)[:2]

  return _reduced(*tf.cond(tf.io.is_jpeg(data), jpeg, other), buffer)


def _decode_all(ds, decode=lambda data: {"image": _decode(data)},
                placeholder=(("image", images.PLACEHOLDER),)):
  """The records with their encoded 'image' replaced by `decode`'s fields (default: the image
  decoded, `_decode`), in order, several at a time; an image that cannot be decoded gets the
  `placeholder` fields (`images.PLACEHOLDER`) with its 'name' in 'skipped' ('' for the others).
  tf.data has no per-element try: each record is decoded in a dataset of its own whose error is
  dropped (ignore_errors), then its placeholder follows, and the first of the two is kept."""
  if ds.element_spec["image"].dtype != tf.string:
    return ds  # Decoded and cached already.

  def decoded(ex):
    return {**ex, **decode(ex["image"]), "skipped": tf.constant("")}

  def one(ex):
    placeholder_ex = {**ex, **{k: tf.constant(v) for k, v in placeholder},
                      "skipped": ex["name"]}
    return (tf.data.Dataset.from_tensors(ex).map(decoded).ignore_errors()
            .concatenate(tf.data.Dataset.from_tensors(placeholder_ex)).take(1))

  out = ds.interleave(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  count = int(ds.cardinality())  # One out per record; interleave cannot tell.
  return out if count == tf.data.UNKNOWN_CARDINALITY else out.apply(
      tf.data.experimental.assert_cardinality(count))


def _decoded_for_device(ds, views, buffer):
  """host_stage=decode: each record {'image': uint8 (buffer, buffer, 3), the `_reduced` image
  in its top-left corner on zeros, 'full', 'factor', 'label', 'skipped'}."""
  if ds.element_spec["image"].dtype == tf.string:
    ds = _decode_all(ds, functools.partial(_decode_reduced, views=views, buffer=buffer),
                     (("image", images.PLACEHOLDER), ("full", np.ones(2, np.int32)),
                      ("factor", np.int32(1))))
  else:  # Decoded and cached already.
    ds = ds.map(lambda ex: {**ex, **_reduced(ex["image"], tf.shape(ex["image"])[:2], buffer)})
  return ds.map(lambda ex: {"image": tf.image.pad_to_bounding_box(ex["image"], 0, 0, buffer,
                                                                  buffer),
                            "full": ex["full"], "factor": ex["factor"], "label": ex["label"],
                            "skipped": ex["skipped"]}, num_parallel_calls=tf.data.AUTOTUNE)


def distorted_window(seed, shape, scale, ratio):
  """(begin, size) of a random crop of an image of `shape` by torchvision's law
  (`crop.crop_window` on TF ops, float64 uniforms as grain's), in the graph.

  Not tf.image.sample_distorted_bounding_box, whose law differs: over 10,000 windows at scale
  (0.2, 1), a mean area of 0.457 of a 375x500 image against torchvision's 0.495.
  """
  u = tf.random.stateless_uniform([crop.ATTEMPTS, 4], seed, dtype=tf.float64)
  height, width = tf.unstack(tf.cast(shape[:2], tf.float64))
  top, left, h, w = crop.crop_window(u, height, width, scale, ratio, xp=_TF_OPS)
  return tf.stack([top, left, 0]), tf.stack([h, w, -1])


def _resize(image, size, method="bilinear"):
  """Bilinear (or `method`, one of crop.INTERPOLATIONS) with antialiasing on downscale, as PIL;
  rounded back to uint8.

  Most of the host stage's CPU time (~1.7 ms a 224-px crop, Pillow's takes ~0.75) and 0.15 grey
  levels from PIL's. antialias=False or method='area' would be faster but differ from PIL's
  bilinear by 0.88 and 0.53; Pillow in a py function would be faster too, but holds the GIL for
  a third of the work, which caps a process at a few cores (benchmarks/RESULTS.md, Input
  pipeline).
  """
  out = tf.image.resize(image, size, method=method, antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def random_resized_crop(seed, image, size, scale, ratio):
  begin, window = distorted_window(seed, tf.shape(image), scale, ratio)
  return tf.ensure_shape(_resize(tf.slice(image, begin, window), (size, size)), [size, size, 3])


def center_crop(image, image_size, resize=0, method="bilinear"):
  """Evaluation crop, as `crop.eval_geometry`: resize the shorter side, centre crop."""
  h, w = tf.unstack(tf.shape(image)[:2])
  short = crop.eval_resize(image_size, resize)
  scaled = lambda a, b: tf.cast(short * tf.cast(a, tf.float64) / tf.cast(b, tf.float64), tf.int32)
  target = tf.cond(h <= w, lambda: tf.stack([short, scaled(w, h)]),
                   lambda: tf.stack([scaled(h, w), short]))
  image = tf.cond(tf.reduce_all(target == tf.stack([h, w])), lambda: image,
                  lambda: _resize(image, target, method))
  top, left = tf.unstack(tf.cast(tf.round((target - image_size) / 2), tf.int32))
  return tf.ensure_shape(tf.image.crop_to_bounding_box(image, top, left, image_size, image_size),
                         [image_size, image_size, 3])


@functools.singledispatch
def _read(source, process_index, process_count, train, seed):
  """The records of this process's share of `source`; equal shares for training."""
  raise ValueError(f"the tf.data loader reads image folders and TFDS, not "
                   f"{type(source).__name__}; use --config.data.loader=grain")


@_read.register
def _(source: sources.Tfds, process_index, process_count, train, seed):
  """Encoded images of a TFDS split; for training the files are read in one seeded order (the
  same every epoch, so that an epoch can be rebuilt)."""
  tfds = sources.import_tfds()
  share = tfds.even_splits(source.split, process_count, drop_remainder=train)[process_index]
  ds = source.builder.as_dataset(
      split=share, shuffle_files=train, decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
                                  try_autocache=False, add_tfds_id=True))
  return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32),
                            "name": ex["tfds_id"]})


@_read.register
def _(source: sources.ImageFolder, process_index, process_count, train, seed):
  del seed  # Files are listed in a fixed order.
  end = len(source) // process_count * process_count if train else len(source)
  return tf.data.Dataset.from_tensor_slices(
      (source.paths[process_index:end:process_count],
       source.labels[process_index:end:process_count])).map(
           lambda path, label: {"image": path, "label": label, "name": path})


def _fetch(source, ds):
  """The records with their encoded images: a folder's records hold file names until here, so
  that an epoch's shuffle holds names, not a folder's bytes (host memory bounded for
  ImageNet-size folders); other sources' records hold them already."""
  if not isinstance(source, sources.ImageFolder):
    return ds
  return ds.map(lambda ex: {**ex, "image": tf.io.read_file(ex["image"])},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _records(source, data_cfg, process_index, process_count, train, seed=None):
  """This process's records (a folder's unread: `_fetch`), decoded and cached when
  data_cfg.cache."""
  ds = _read(source, process_index, process_count, train, seed)
  if data_cfg.cache:
    ds = _decode_all(_fetch(source, ds)).cache()
  return ds


def _to_numpy(ds, data_cfg):
  options = tf.data.Options()
  options.deterministic = True
  return ds.prefetch(data_cfg.prefetch).with_options(options).as_numpy_iterator()


def _stream(source, data_cfg, process_index, process_count, seed, key, start):
  """The records of `source`'s infinite stream from its element `start` on: epoch e is its
  own shuffle, seeded by (`key`, e) (full for folders and cached data, a `shuffle_buffer`
  window over TFDS records read in a seeded file order); an epoch is rebuilt to resume."""
  records = _records(source, data_cfg, process_index, process_count, train=True, seed=seed)
  per_epoch = int(records.cardinality())
  windowed = isinstance(source, sources.Tfds) and not data_cfg.cache
  buffer = data_cfg.shuffle_buffer if windowed else per_epoch

  def epoch(e):
    shuffle_seed = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(key, e), minval=None, maxval=None,
        dtype=tf.int64)
    return records.shuffle(buffer, seed=shuffle_seed)

  ds = tf.data.Dataset.range(start // per_epoch, np.iinfo(np.int64).max).flat_map(epoch)
  ds = ds.skip(start % per_epoch)
  return ds if data_cfg.cache else _fetch(source, ds)


def train_batches(source, data_cfg, *, views, batch_size, seed, start_step, process_index,
                  process_count):
  """Infinite host batches {'views': tuple of uint8 (B, s, s, 3), 'label': int32 (B,)}, or with
  data_cfg.host_stage='decode' the decoded images for the step to crop (`_decoded_for_device`).

  Each epoch is its own shuffle (`_stream`); batches run across epoch boundaries. A
  `sources.Mixture` is tf.data's choose_from_datasets over its parts' streams (each shuffled by
  seeds of its own), the choices following its law (`Mixture.cycle`), each stream resumed at
  the images of it the positions before `start_step` hold (`Mixture.drawn`).
  """
  base = tf.constant([seed, process_index], tf.int64)
  stream = functools.partial(_stream, data_cfg=data_cfg, process_index=process_index,
                             process_count=process_count, seed=seed)
  start = start_step * batch_size
  if isinstance(source, sources.Mixture):
    choices = tf.data.Dataset.from_tensor_slices(source.cycle).repeat().skip(
        start % len(source.cycle))
    ds = tf.data.Dataset.choose_from_datasets(
        [stream(part, key=tf.random.experimental.stateless_fold_in(base, k), start=int(n))
         for k, (part, n) in enumerate(zip(source.parts, source.drawn(start)))], choices)
  else:
    ds = stream(source, key=base, start=start)

  def crops(ex):
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(base, ex["position"]), len(views))
    return {"views": tuple(random_resized_crop(s, ex["image"], v.size, v.scale, v.ratio)
                           for s, v in zip(tf.unstack(seeds), views)),
            "label": ex["label"], "skipped": ex["skipped"]}

  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start), ds).map(
      lambda position, ex: {**ex, "position": position})
  if data_cfg.host_stage == "decode":  # No randomness here: the step draws the windows.
    ds = _decoded_for_device(ds, views, data_cfg.decode_size)
  else:
    ds = _decode_all(ds).map(crops, num_parallel_calls=tf.data.AUTOTUNE)
  return _to_numpy(ds.batch(batch_size, drop_remainder=True), data_cfg)


def eval_batches(source, data_cfg, *, batch_size, num_batches, process_index, process_count):
  """`num_batches` host batches {'image', 'label', 'mask'} of `source`: every example of this
  process's share once, then padding (`pipeline.eval_iterator`)."""
  records = _records(source, data_cfg, process_index, process_count, train=False)
  size = data_cfg.image_size
  ds = _decode_all(records if data_cfg.cache else _fetch(source, records)).map(
      lambda ex: {"image": center_crop(ex["image"], size, data_cfg.eval_resize,
                                       data_cfg.eval_interpolation), "label": ex["label"],
                  "mask": tf.equal(ex["skipped"], ""), "skipped": ex["skipped"]},
      num_parallel_calls=tf.data.AUTOTUNE)
  pad = {"image": tf.zeros([size, size, 3], tf.uint8), "label": 0, "mask": False,
         "skipped": ""}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(num_batches * batch_size)
  return _to_numpy(ds.batch(batch_size), data_cfg)

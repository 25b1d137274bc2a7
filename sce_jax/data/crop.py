"""Crop geometry shared by the host (NumPy, TF) and accelerator (JAX) stages (docs/SCE.md 6, 7).

One implementation of torchvision's RandomResizedCrop sampling rule, written against an array
namespace `xp` (numpy, jax.numpy, or TF ops) so that the grain path, the tf.data path and the
on-device crop draw windows the same way from the same uniforms.
"""
import functools
import math

import numpy as np

ATTEMPTS = 10  # torchvision tries 10 windows before falling back to a centre crop.


def crop_window(u, height, width, scale, ratio, xp=np):
  """torchvision RandomResizedCrop window from uniforms `u` of shape (..., ATTEMPTS, 4).

  Per attempt: area fraction uniform in `scale`, log aspect ratio uniform in log(`ratio`),
  w = round(sqrt(area * r)), h = round(sqrt(area / r)); the first attempt that fits is kept,
  with its offset uniform over the valid positions. If none fits: the centre crop of the largest
  window whose aspect ratio lies in `ratio`. Vectorised (all attempts drawn at once), same law.
  `height` and `width` may be traced (TF's decoded images have no static shape), so the
  arithmetic stays in u's float dtype and uses only xp's exp, sqrt, round (half to even, as
  Python's), floor, where, stack, cumsum, sum, any and asarray (a cast).

  Returns:
    (top, left, h, w) int32 arrays of shape u.shape[:-2].
  """
  area = height * width
  target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = xp.exp(log_lo + u[..., 1] * (log_hi - log_lo))
  w = xp.round(xp.sqrt(target * aspect))
  h = xp.round(xp.sqrt(target / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  tries = xp.stack([xp.floor(u[..., 2] * (height - h + 1)), xp.floor(u[..., 3] * (width - w + 1)),
                    h, w], -1)

  first = fits & (xp.cumsum(xp.where(fits, 1, 0), -1) == 1)  # One-hot; none if none fits.
  picked = xp.sum(xp.where(first[..., None], tries, 0), -2)

  lo, hi = min(ratio), max(ratio)
  fb_h = xp.where(width / height < lo, xp.round(width / lo), height)
  fb_w = xp.where(width / height > hi, xp.round(height * hi), width)
  fallback = xp.stack([xp.floor((height - fb_h) / 2), xp.floor((width - fb_w) / 2), fb_h, fb_w])
  window = xp.asarray(xp.where(xp.any(fits, -1)[..., None], picked, fallback), xp.int32)
  return tuple(window[..., i] for i in range(4))


# data.host_stage: "crops" (the host decodes and crops, the step gets uint8 crops) or "decode"
# (the host only decodes, into a buffer; the step crops, `augment.random_resized_crop`).
HOST_STAGES = ("crops", "decode")
DCT_SCALES = (1, 2, 4, 8)  # libjpeg's reduced-size decodes (PIL's draft, TF's ratio).
# host_stage=decode's buffer on grain: RGB and a fourth byte the step does not read, Pillow's own
# layout of RGB pixels, which grain decodes into with no repacking (`images.decode`). tf.data's
# keeps 3: padding a channel there cost it ~40 % of its rate (benchmarks/RESULTS.md).
DECODE_CHANNELS = 4


def decode_batch_shapes(batch, buffer, channels=DECODE_CHANNELS):
  """host_stage=decode's host batch, {key: (shape, dtype)}: each image in the top-left corner
  of its buffer on zeros, its full (height, width), its total reduction factor (`reduction`),
  its label. Its one description: the host stages fill it (tf.data with 3 channels),
  `sce_jax.aot` and benchmarks/throughput.py stand in for it."""
  return {"image": ((batch, buffer, buffer, channels), np.uint8),
          "full": ((batch, 2), np.int32), "factor": ((batch,), np.int32),
          "label": ((batch,), np.int32)}


def reduction(height, width, views, buffer, xp=np):
  """(DCT scale, integer factor) by which host_stage=decode stores a height x width image.

  Every window RandomResizedCrop can give (`crop_window`; its smallest side is round(sqrt(
  scale[0] x area x the extreme ratio))) stays at or above its view's size under any reduction
  up to `fit`, so each crop stays a downscale, as the host's crops are. An image decoded at DCT
  scale s (libjpeg) and box-reduced by k (Pillow's reduce) has ceil(side / s) / k pixels a side
  and must lie within `buffer`. Of DCT_SCALES, the one whose total s x k is smallest, counting
  any total up to the largest DCT scale within `fit` as free; ties to the larger scale (a faster
  decode). So an image of ImageNet's usual size is decoded whole; one that needs a reduction of
  3 is decoded whole and reduced by 3, not decoded at 1/2 and reduced by 2. Written against `xp`
  (numpy, or TF ops: maximum, minimum, sqrt, round, ceil, where, ones_like) for both host stages.
  """
  area = height * width
  fits = [xp.round(xp.sqrt(v.scale[0] * area * min(v.ratio[0], 1 / v.ratio[1]))) / v.size
          for v in views]
  fit = functools.reduce(xp.minimum, fits)
  one = xp.ones_like(fit)  # Constants in fit's dtype (TF does not promote).
  free = one
  for s in DCT_SCALES[1:]:
    free = xp.where(fit >= s, s * one, free)
  longest = xp.maximum(height, width)
  best = None
  for s in DCT_SCALES:
    k = xp.ceil(xp.ceil(longest / s) / buffer)
    cost = xp.maximum(s * k, free)
    if best is None:
      best = (cost, s * one, k)
    else:
      better = cost <= best[0]
      best = tuple(xp.where(better, new, old) for new, old in zip((cost, s * one, k), best))
  return best[1], best[2]


def is_small(image_size) -> bool:
  """CIFAR, STL-10, Tiny ImageNet (image_size < 128) take the small-dataset protocols of
  docs/SCE.md section 7 (plain test image, padded random crop); larger sets ImageNet's."""
  return image_size < 128


# data.eval_interpolation: the evaluation resize's filter (PIL's / TF's antialiased one).
INTERPOLATIONS = ("bilinear", "bicubic")


def eval_resize(image_size, resize=0):
  """Shorter side before the centre crop: `resize` when > 0 (data.eval_resize), else
  image_size * 256/224 for ImageNet-size inputs.

  Docs section 7: resize 256 + centre crop 224. Small sets are only resized to image_size, a
  no-op at their native size. The transfer protocol resizes to the crop itself (docs/SCE.md 9).
  """
  if resize > 0:
    return resize
  return image_size if is_small(image_size) else int(round(image_size * 256 / 224))


def eval_geometry(height, width, image_size, resize=0):
  """torchvision Resize(shorter side) + CenterCrop: ((resized h, w), (top, left))."""
  short = eval_resize(image_size, resize)
  if height <= width:
    size = (short, int(short * width / height))
  else:
    size = (int(short * height / width), short)
  offset = tuple(int(round((s - image_size) / 2)) for s in size)
  return size, offset

"""Crop geometry shared by the host (NumPy) and accelerator (JAX) stages (docs/SCE.md 6, 7).

One implementation of torchvision's RandomResizedCrop sampling rule, written against an array
namespace `xp` (numpy or jax.numpy) so the grain path and the on-device crop draw windows the
same way from the same uniforms.
"""
import math

import numpy as np

ATTEMPTS = 10  # torchvision tries 10 windows before falling back to a centre crop.


def crop_window(u, height, width, scale, ratio, xp=np):
  """torchvision RandomResizedCrop window from uniforms `u` of shape (..., ATTEMPTS, 4).

  Per attempt: area fraction uniform in `scale`, log aspect ratio uniform in log(`ratio`),
  w = round(sqrt(area * r)), h = round(sqrt(area / r)); the first attempt that fits is kept,
  with its offset uniform over the valid positions. If none fits: the centre crop of the largest
  window whose aspect ratio lies in `ratio`. Vectorised (all attempts drawn at once), same law.

  Returns:
    (top, left, h, w) int32 arrays of shape u.shape[:-2].
  """
  area = height * width
  target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = xp.exp(log_lo + u[..., 1] * (log_hi - log_lo))
  w = xp.round(xp.sqrt(target * aspect)).astype(xp.int32)
  h = xp.round(xp.sqrt(target / aspect)).astype(xp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = xp.argmax(fits, axis=-1)[..., None]
  pick = lambda a: xp.take_along_axis(a, first, axis=-1)[..., 0]
  h, w = pick(h), pick(w)
  top = xp.floor(pick(u[..., 2]) * (height - h + 1)).astype(xp.int32)
  left = xp.floor(pick(u[..., 3]) * (width - w + 1)).astype(xp.int32)

  in_ratio = width / height
  if in_ratio < min(ratio):
    fb_w, fb_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fb_w, fb_h = int(round(height * max(ratio))), height
  else:
    fb_w, fb_h = width, height
  ok = fits.any(axis=-1)
  return (xp.where(ok, top, (height - fb_h) // 2), xp.where(ok, left, (width - fb_w) // 2),
          xp.where(ok, h, fb_h), xp.where(ok, w, fb_w))


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

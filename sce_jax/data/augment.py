"""Accelerator stage of the augmentations (docs/SCE.md section 6), jittable and shardable.

The host only crops (uint8), or only decodes (data.host_stage=decode, data on the device: the
crops are made here, `crop_and_augment`); everything random and per-pixel after the crop runs
here, one key per image: flip, colour jitter, grayscale, blur, solarize, normalise - the BYOL/SCE order.
Colour ops follow torchvision (blends clamped to [0, 1] after each op), not TF: dm-pix's
brightness/contrast/saturation have TF semantics, so only those are written here; its HSV hue
rotation, flip, blur kernel and solarize already match torchvision and are used as they are.
"""

import dm_pix as pix
import jax
import jax.numpy as jnp

from sce_jax.data import crop
from sce_jax.data.presets import ViewSpec

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL convert('L') and docs/SCE.md 6.


def _gray(x):
  return jnp.dot(x, jnp.asarray(GRAY_WEIGHTS, x.dtype))[..., None]


def _blend(x, degenerate, factor):
  return jnp.clip(factor * x + (1 - factor) * degenerate, 0.0, 1.0)


def adjust_brightness(x, factor):
  """torchvision/PIL brightness: blend with black."""
  return _blend(x, 0.0, factor)


def adjust_contrast(x, factor):
  """torchvision/PIL contrast: blend with the mean of the grayscale image."""
  return _blend(x, jnp.mean(_gray(x)), factor)


def adjust_saturation(x, factor):
  """torchvision saturation (PIL ImageEnhance.Color): blend with the grayscale image."""
  return _blend(x, _gray(x), factor)


def adjust_hue(x, delta):
  """torchvision hue: rotate H in HSV by `delta` (a fraction of a turn)."""
  return jnp.clip(pix.adjust_hue(x, delta), 0.0, 1.0)


def to_grayscale(x):
  """Three-channel grayscale, as torchvision RandomGrayscale."""
  return jnp.broadcast_to(_gray(x), x.shape)


def gaussian_blur(x, sigma, kernel_size):
  """torchvision GaussianBlur: separable, reflect padding; the kernel is dm-pix's (same law)."""
  pad = kernel_size // 2
  x = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  return pix.gaussian_blur(x, sigma, kernel_size, padding="VALID")


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_params(key, spec: ViewSpec):
  """The random draws of one image (torchvision's laws); exposed so tests can count them."""
  k_u, k_order = jax.random.split(key)
  u = jax.random.uniform(k_u, (10,))
  strengths = jnp.array([spec.brightness, spec.contrast, spec.saturation])
  lo = jnp.maximum(0.0, 1.0 - strengths)
  return {
      "flip": u[0] < spec.flip,
      "jitter": u[1] < spec.jitter,
      "order": jax.random.permutation(k_order, len(JITTER_OPS)),
      "factors": jnp.append(lo + u[2:5] * (1.0 + strengths - lo), spec.hue * (2 * u[5] - 1)),
      "gray": u[6] < spec.gray,
      "blur": u[7] < spec.blur,
      "sigma": spec.blur_sigma[0] + u[8] * (spec.blur_sigma[1] - spec.blur_sigma[0]),
      "solarize": u[9] < spec.solarize,
  }


def _color_jitter(x, order, factors):
  """The four jitter ops in the per-image random `order` (torchvision ColorJitter)."""
  branches = [lambda x, op=op, f=f: op(x, f) for op, f in zip(JITTER_OPS, factors)]
  return jax.lax.fori_loop(0, len(order), lambda i, x: jax.lax.switch(order[i], branches, x), x)


def apply_params(x, params, spec: ViewSpec):
  """Augments one float image in [0, 1] (H, W, 3) with drawn `params`, in the BYOL/SCE order.

  Each op is drawn on its own probability, named as in `ViewSpec`; ops with probability 0 are
  left out of the trace.
  """
  ops = (
      ("flip", pix.flip_left_right),
      ("jitter", lambda x: _color_jitter(x, params["order"], params["factors"])),
      ("gray", to_grayscale),
      ("blur", lambda x: gaussian_blur(x, params["sigma"], spec.blur_kernel)),
      ("solarize", lambda x: pix.solarize(x, 0.5)),
  )
  for name, op in ops:
    if getattr(spec, name) > 0:
      x = jnp.where(params[name], op(x), x)
  return x


def augment_view(key, images, spec: ViewSpec, mean, std):
  """Augments a uint8 batch (B, H, W, 3) of one view; returns normalised float32.

  One key per image (split, then vmap), so the result does not depend on how the batch is
  sharded: the same key gives the same images on one device or on a mesh.
  """
  keys = jax.random.split(key, images.shape[0])
  params = jax.vmap(sample_params, in_axes=(0, None))(keys, spec)
  x = images.astype(jnp.float32) / 255.0
  x = jax.vmap(apply_params, in_axes=(0, 0, None))(x, params, spec)
  return normalize(x, mean, std)


def normalize(x, mean, std):
  """[0, 1] float images to the networks' input scale with the dataset's mean and std
  (docs/SCE.md 6)."""
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment_views(key, views, specs, mean, std):
  """augment_view on each view with its own key."""
  keys = jax.random.split(key, len(views))
  return [augment_view(k, v, s, mean, std) for k, v, s in zip(keys, views, specs)]


def augment_batch(key, batch, specs, mean, std):
  """The step's input stage for a batch of uint8 crops {'views', 'label'}: `augment_views`."""
  return {**batch, "views": augment_views(key, batch["views"], specs, mean, std)}


def crop_windows(key, n, height, width, scale, ratio):
  """`random_resized_crop`'s windows (top, left, h, w) for n images of height x width (scalars,
  or one per image): one key per image."""
  keys = jax.random.split(key, n)
  u = jax.vmap(lambda k: jax.random.uniform(k, (crop.ATTEMPTS, 4)))(keys)
  one = lambda u, height, width: crop.crop_window(u, height, width, scale, ratio, xp=jnp)
  return jax.vmap(one)(u, jnp.broadcast_to(height, (n,)), jnp.broadcast_to(width, (n,)))


def pil_weights(out_size, start, length, extent, in_size):
  """(out_size, in_size) weights of Pillow's antialiased bilinear resize of the span [start,
  start + length) of an axis to out_size pixels (Resample.c, precompute_coeffs): output pixel i
  is centred at start + (i + 0.5) * scale, scale = length / out_size, and takes a triangle of
  half-width max(scale, 1) over the pixels centred at j + 0.5, normalised over the pixels that
  exist (j < extent; those of a padded buffer past it do not). Every centre lies inside the
  image, so its nearest pixel (< 0.5 away, < the half-width) keeps each row's sum positive."""
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size) + 0.5) * scale
  x = jnp.arange(in_size) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(x[None, :] - centre[:, None]) / support)
  w = jnp.where(jnp.arange(in_size) < extent, w, 0.0)
  return w / jnp.sum(w, -1, keepdims=True)


def _round_uint8(x):
  """Pillow's rounding of each pass: half up (its fixed point adds 1 << 21, then shifts), clipped."""
  return jnp.clip(jnp.floor(x + 0.5), 0, 255)


def resize_window(image, window, extent, size):
  """Pillow's `image.resize((size, size), BILINEAR, box)` of the window (top, left, h, w; float,
  in pixels of `image`) of an image whose true (height, width) `extent` lies in the top-left
  corner of the uint8 buffer `image` (H, W, C): the horizontal pass, rounded to uint8, then the
  vertical one, as Pillow does, with its weights (`pil_weights`) as dense matrices, in float32
  at full precision (bf16 passes on TPU and TF32 on GPU would cost ~1 grey level)."""
  top, left, h, w = window
  wy = pil_weights(size, top, h, extent[0], image.shape[0])
  wx = pil_weights(size, left, w, extent[1], image.shape[1])
  highest = jax.lax.Precision.HIGHEST
  rows = _round_uint8(jnp.einsum("xw,hwc->hxc", wx, image.astype(jnp.float32), precision=highest))
  return _round_uint8(jnp.einsum("yh,hxc->yxc", wy, rows, precision=highest)).astype(jnp.uint8)


def random_resized_crop(key, images, size, scale, ratio, full=None, factor=None):
  """On-device RandomResizedCrop of a uint8 batch (B, H, W, 3) to (B, size, size, 3).

  Windows follow torchvision's rule (`crop.crop_window`, shared with the host paths), drawn on
  each image's full-resolution (height, width) `full` ((B, 2) int; default the arrays' own);
  the images may be stored smaller by an integer `factor` ((B,); the host's reduced decode,
  `crop.reduction`, padded into the buffer), the windows scaled down with them. The resize is
  Pillow's bilinear with antialiasing (`resize_window`), as the host's crops.
  """
  b, height, width, _ = images.shape
  full = jnp.broadcast_to(jnp.asarray((height, width) if full is None else full), (b, 2))
  factor = jnp.ones((b,)) if factor is None else jnp.asarray(factor)
  windows = jnp.stack(crop_windows(key, b, full[:, 0], full[:, 1], scale, ratio), -1)
  windows = windows / factor[:, None].astype(jnp.float32)
  extent = -(-full // factor[:, None])  # ceil: libjpeg's scaled decode and Pillow's reduce.
  return jax.vmap(lambda i, wnd, e: resize_window(i, tuple(wnd), e, size))(images, windows,
                                                                          extent)


def crop_and_augment(key, batch, specs, mean, std):
  """The step's input stage for whole images {'image': uint8 (B, H, W, 3), 'label'} (data on the
  device, or host_stage=decode with the host's 'full' and 'factor' and on grain a fourth
  channel, unread: `crop.decode_batch_shapes`): one `random_resized_crop` per view, then `augment_batch`.
  Every draw comes from `key`, one key per image, so the crops do not depend on the host, the
  sharding or where a run resumed."""
  crop_key, colour_key = jax.random.split(key)
  image = batch["image"][..., :3]
  crops = [random_resized_crop(k, image, s.size, s.scale, s.ratio, batch.get("full"),
                               batch.get("factor"))
           for k, s in zip(jax.random.split(crop_key, len(specs)), specs)]
  return augment_batch(colour_key, {"views": crops, "label": batch["label"]}, specs, mean, std)


def random_pad_crop(key, images, padding):
  """torchvision RandomCrop(size, padding): zero-pad, then a uniform window of the input size."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
  crop_one = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0),
                                                    (h, w, image.shape[-1]))
  return jax.vmap(crop_one)(padded, offsets)

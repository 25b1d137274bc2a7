"""Accelerator stage of the augmentations (docs/SCE.md section 6), jittable and shardable.

The host only crops (uint8); everything random and per-pixel after the crop runs here, one key
per image: flip, colour jitter, grayscale, blur, solarize, normalise - the BYOL/SCE order.
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
  """`random_resized_crop`'s windows (top, left, h, w) for n images: one key per image."""
  keys = jax.random.split(key, n)
  u = jax.vmap(lambda k: jax.random.uniform(k, (crop.ATTEMPTS, 4)))(keys)
  return crop.crop_window(u, height, width, scale, ratio, xp=jnp)


def random_resized_crop(key, images, size, scale, ratio):
  """On-device RandomResizedCrop of a uint8 batch (B, H, W, 3) to (B, size, size, 3).

  For data held on the accelerator (the TF-free in-memory case). Windows follow torchvision's
  rule (`crop.crop_window`, shared with the host path); the resize is bilinear with
  antialiasing on downscale, as PIL's, via jax.image.scale_and_translate.
  """
  _, height, width, _ = images.shape
  windows = crop_windows(key, images.shape[0], height, width, scale, ratio)

  def resize(image, top, left, h, w):
    factor = jnp.array([size / h, size / w])
    out = jax.image.scale_and_translate(
        image.astype(jnp.float32), (size, size, image.shape[-1]), (0, 1), factor,
        -jnp.array([top, left]) * factor, method="linear", antialias=True)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

  return jax.vmap(resize)(images, *windows)


def random_pad_crop(key, images, padding):
  """torchvision RandomCrop(size, padding): zero-pad, then a uniform window of the input size."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
  crop_one = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0),
                                                    (h, w, image.shape[-1]))
  return jax.vmap(crop_one)(padded, offsets)

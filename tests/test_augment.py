"""Accelerator-stage augmentations against Pillow, NumPy and torchvision's laws (docs/SCE.md 6)."""
import collections
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from PIL import ImageEnhance

from sce_jax.data import augment
from sce_jax.data import crop
from sce_jax.data import presets

# Every op off: tests switch on the one they look at.
OFF = presets.ViewSpec(32, flip=0.0, jitter=0.0, gray=0.0, blur=0.0, solarize=0.0)
# Mean absolute error against Pillow, in 1/255 units. The ops here are float; Pillow works in
# uint8, and its rounding bounds the gap per pixel and channel (clipping to [0, 255] on both
# sides only shrinks it), so these bounds hold on any image:
# - brightness: Image.blend truncates to uint8 (floor, not round): < 1.
# - saturation: ImageEnhance.Color blends with convert("L"), a luma rounded to uint8 (off by
#   <= 0.5 + 0.003, the 0.003 from its 16-bit fixed-point weights), weighted by |1 - factor|
#   = 0.4, then truncates: < 1 + 0.4 * 0.503 = 1.21.
# - contrast: the blend target is int(mean(L) + 0.5), off from the float mean luma by <= 0.5
#   (the mean of L's per-pixel rounding) + 0.5 (rounding the mean) + 0.003: < 1 + 0.4 * 1.003
#   = 1.41.
# - grayscale: L's rounding, <= 0.503.
# - crop and resize: Pillow's weights and its rounding after each pass on both sides
#   (augment.resize_window); its 22-bit fixed point moves a pixel only next to a rounding tie,
#   by <= 2 (tests/test_host_stage.py). A different filter or window would show on any
#   textured image.
# - hue: see test_hue_matches_pillow_hsv; there the bound needs images of mean chroma < 2/7.
MAX_MAE = 2.0


@pytest.fixture(scope="module")
def images(cifar_root):
  """20 generated natural-like test images (two per class; see conftest.natural_image), as PIL
  images and a float batch in [0, 1]. tests/test_real_data.py runs the colour checks on real
  CIFAR-10 images."""
  files = sorted(cifar_root.glob("test/*/*.jpg"))[::5]
  pil = [Image.open(f).convert("RGB") for f in files]
  return pil, jnp.asarray(np.stack([np.asarray(im) for im in pil]), jnp.float32) / 255


def _mae(out, reference):
  return np.abs(np.asarray(out) * 255 - np.stack(reference).astype(np.float64)).mean()


def _pil_hue(image, delta):
  """torchvision's adjust_hue on PIL images: shift H of PIL's HSV, wrapping in uint8."""
  h, s, v = image.convert("HSV").split()
  h = (np.asarray(h).astype(np.int64) + int(np.round(delta * 255))) % 256
  return np.asarray(Image.merge("HSV", (Image.fromarray(h.astype(np.uint8), "L"), s, v))
                    .convert("RGB"))


FACTORS = (0.6, 1.4)
BLEND_OPS = (
    (augment.adjust_brightness, ImageEnhance.Brightness),
    (augment.adjust_contrast, ImageEnhance.Contrast),
    (augment.adjust_saturation, ImageEnhance.Color),
)
HUE_DELTAS = (-0.1, 0.05, 0.1)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("op, enhance", BLEND_OPS)
def test_blend_ops_match_pillow(images, op, enhance, factor):
  pil, x = images
  out = jax.vmap(op, in_axes=(0, None))(x, factor)
  assert _mae(out, [np.asarray(enhance(im).enhance(factor)) for im in pil]) < MAX_MAE


@pytest.mark.parametrize("delta", HUE_DELTAS)
def test_hue_matches_pillow_hsv(images, delta):
  """Pillow's HSV (torchvision's adjust_hue on PIL images) keeps H and S truncated to uint8
  with a turn = 255 steps; the shift is round(255 * delta) steps, wrapped mod 256. Its hue is
  off from the exact one by truncation (-1, 0], rounding the shift (+0.5, +0.25, -0.5 for
  delta = 0.1, 0.05, -0.1) and a wrap (-1 or +1; mod 256, not 255): under 1.75 steps. At fixed
  S and V one channel at a time moves with hue, by 6 * c per step (c = (max - min) / 255, the
  chroma), so hue moves the three channels by < 10.5 * c together; S's truncation (< 1/255)
  moves two by < V / 255 <= 1 each; rounding two channels (max = V is exact) adds <= 1. Per
  pixel the mean over channels is < 1 + 3.5 * c, so the MAE is < 1 + 3.5 * mean(c): under
  MAX_MAE when mean(c) < 2/7. That holds for photographs (real CIFAR-10's is ~0.13), not for
  every image: over all 2**24 colours, strongly coloured pixels (c near 1) reach ~3.7."""
  pil, x = images
  assert float(jnp.mean(jnp.max(x, -1) - jnp.min(x, -1))) < 2 / 7
  out = jax.vmap(augment.adjust_hue, in_axes=(0, None))(x, delta)
  assert _mae(out, [_pil_hue(im, delta) for im in pil]) < MAX_MAE


def test_grayscale_matches_pillow(images):
  pil, x = images
  out = jax.vmap(augment.to_grayscale)(x)
  assert _mae(out, [np.asarray(im.convert("L").convert("RGB")) for im in pil]) < MAX_MAE


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_numpy_separable_reflect(images, sigma):
  _, x = images
  kernel_size = 23
  t = np.linspace(-(kernel_size // 2), kernel_size // 2, kernel_size)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  k /= k.sum()
  ref = np.pad(np.asarray(x, np.float64), ((0, 0), (11, 11), (11, 11), (0, 0)), mode="reflect")
  ref = sum(k[i] * ref[:, i:i + 32] for i in range(kernel_size))
  ref = sum(k[i] * ref[:, :, i:i + 32] for i in range(kernel_size))
  out = jax.vmap(augment.gaussian_blur, in_axes=(0, None, None))(x, sigma, kernel_size)
  np.testing.assert_allclose(out, ref, atol=2e-6)


@pytest.mark.parametrize("name, expected", [
    ("flip", lambda x: x[:, :, ::-1]),
    ("gray", lambda x: np.repeat(x @ np.array(augment.GRAY_WEIGHTS), 3).reshape(x.shape)),
    ("solarize", lambda x: np.where(x >= 0.5, 1 - x, x)),
])
def test_augment_view_applies_op_then_normalises(images, name, expected):
  _, x = images
  uint8 = np.asarray(jnp.round(x * 255), np.uint8)
  spec = dataclasses.replace(OFF, **{name: 1.0})
  out = augment.augment_view(jax.random.key(0), uint8, spec, 0.5, 0.25)
  ref = (expected(uint8.astype(np.float64) / 255) - 0.5) / 0.25
  np.testing.assert_allclose(out, ref, atol=1e-5)


def _sigma_bound(count, n, p):
  return abs(count - n * p) <= 3 * np.sqrt(n * p * (1 - p)) + 1e-9


def test_draw_frequencies_and_ranges():
  """Over 10,000 draws each op fires with its probability and each of the 24 jitter orders
  is equally likely (3 sigma); factors stay in torchvision's ranges and cover them."""
  n = 10_000
  spec = presets.ViewSpec(32, flip=0.5, jitter=0.8, gray=0.2, blur=0.5, solarize=0.2,
                          brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
  params = jax.vmap(augment.sample_params, in_axes=(0, None))(
      jax.random.split(jax.random.key(0), n), spec)
  params = jax.tree.map(np.asarray, params)
  for name in ("flip", "jitter", "gray", "blur", "solarize"):
    assert _sigma_bound(params[name].sum(), n, getattr(spec, name)), name
  orders = collections.Counter(map(tuple, params["order"]))
  assert set(orders) == set(itertools.permutations(range(4)))
  assert all(_sigma_bound(c, n, 1 / 24) for c in orders.values()), orders
  factors = params["factors"]
  for column, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
    assert lo <= factors[:, column].min() < lo + 0.01 and hi - 0.01 < factors[:, column].max() <= hi
  assert 0.1 <= params["sigma"].min() < 0.2 and 1.9 < params["sigma"].max() <= 2.0


def test_draws_decide_the_image():
  """augment_view uses one key per image: image i is apply_params with draw i."""
  spec = presets.cifar(32)[1]
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  uint8 = np.asarray(jnp.round(x * 255), np.uint8)
  key = jax.random.key(2)
  out = augment.augment_view(key, uint8, spec, 0.0, 1.0)
  one = jax.jit(lambda k, x: augment.apply_params(x / 255.0, augment.sample_params(k, spec), spec))
  for i, k in enumerate(jax.random.split(key, 4)):
    ref = one(k, uint8[i])
    np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_sharded_batch_matches_one_device(images):
  """Same key, same result on one device and with the batch sharded over 8 devices."""
  _, x = images
  uint8 = np.asarray(jnp.round(x[:16] * 255), np.uint8)
  specs = presets.cifar(32)
  fn = jax.jit(lambda key, a, b: augment.augment_views(
      key, (a, b), specs, presets.CIFAR10_MEAN, presets.CIFAR10_STD))
  key = jax.random.key(3)
  single = fn(key, uint8, uint8)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded_in = jax.device_put(uint8, NamedSharding(mesh, P("data")))
  sharded = fn(key, sharded_in, sharded_in)
  assert sharded[0].sharding.spec == P("data")
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert not np.allclose(single[0], single[1])  # Views draw independently.


def test_jax_crop_window_law():
  """10,000 JAX-drawn windows: area fraction within `scale` (up to rounding), covering it."""
  height, width, scale, ratio = 350, 400, (0.2, 1.0), (3 / 4, 4 / 3)
  u = jax.random.uniform(jax.random.key(0), (10_000, crop.ATTEMPTS, 4))
  top, left, h, w = map(np.asarray, crop.crop_window(u, height, width, scale, ratio, xp=jnp))
  area = h * w / (height * width)
  assert 0.2 - 0.01 <= area.min() < 0.21 and 0.97 < area.max() <= 1.0
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  aspect = w / h
  assert 3 / 4 - 0.02 <= aspect.min() and aspect.max() <= 4 / 3 + 0.02


def test_jax_random_resized_crop_matches_pil(images):
  """The on-device crop resizes like PIL's bilinear (antialiased) resize of the same window."""
  pil, x = images
  uint8 = np.asarray(jnp.round(x * 255), np.uint8)
  key = jax.random.key(4)
  size, scale, ratio = 24, (0.2, 1.0), (3 / 4, 4 / 3)
  out = jax.jit(augment.random_resized_crop, static_argnums=(2, 3, 4))(
      key, uint8, size, scale, ratio)
  u = jax.vmap(lambda k: jax.random.uniform(k, (crop.ATTEMPTS, 4)))(
      jax.random.split(key, len(pil)))
  windows = np.stack(crop.crop_window(u, 32, 32, scale, ratio, xp=jnp), axis=-1)
  ref = [np.asarray(im.resize((size, size), Image.BILINEAR, box=(l, t, l + w, t + h)))
         for im, (t, l, h, w) in zip(pil, windows)]
  assert out.dtype == np.uint8 and out.shape == (len(pil), size, size, 3)
  assert np.abs(np.asarray(out, np.float64) - np.stack(ref)).mean() < MAX_MAE

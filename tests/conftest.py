"""Test set-up: 8 fake CPU devices (before JAX starts) and a small generated CIFAR-10 stand-in."""
import colorsys
import io
import os
import pickle
import tarfile

# XLA's CPU backend spends most of a test's time in LLVM optimisation (a tiny ResNet's init
# takes ~40 s to compile at the default level, ~4 s at level 0); tests run tiny models, so
# compile speed matters more than kernel speed. Subprocesses inherit this.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _upsample(a, size):
  """Bicubic upsampling of a float (h, w, c) array to (size, size, c), one Pillow 'F' image a
  channel."""
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c], np.float32))
                              .resize((size, size), Image.BICUBIC))
                   for c in range(a.shape[-1])], axis=-1)


def _colour(rng, hue, spread):
  """An RGB colour in [0, 1] near `hue`, of moderate saturation (photographs are mostly
  greyish: real CIFAR-10 has a mean chroma max - min of about 0.13)."""
  return np.array(colorsys.hsv_to_rgb((hue + rng.normal(0, spread)) % 1.0,
                                      rng.uniform(0.05, 0.5), rng.uniform(0.1, 1.0)))


def natural_image(rng, hue, size=32):
  """A uint8 (size, size, 3) image with the make-up of a small photograph: smooth regions with
  a horizon, a few shaded objects with soft edges, texture and sensor-like noise. Colours
  scatter around `hue` (backgrounds closely, objects loosely), so classes differ somewhat."""
  y, x = np.mgrid[0:size, 0:size] + 0.5
  # Background: sky and ground split by a slanted, more or less sharp horizon; each a coarse
  # 3x3 field of brightness variations of one colour, upsampled bicubically.
  fields = [_upsample(_colour(rng, hue, 0.05) * (1 + 0.25 * rng.normal(0, 1, (3, 3, 1))
                                                 + 0.05 * rng.normal(0, 1, (3, 3, 3))), size)
            for _ in range(2)]
  horizon = rng.uniform(0.3, 0.8) * size + rng.uniform(-0.4, 0.4) * (x - size / 2)
  below = (1 / (1 + np.exp(-(y - horizon) / rng.uniform(0.3, 3.0))))[..., None]
  image = fields[0] * (1 - below) + fields[1] * below
  for _ in range(rng.integers(1, 4)):  # Objects: ellipses lit from one side, edges ~1 px soft.
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.1, 0.35, 2) * size
    angle = rng.uniform(0, np.pi)
    u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / rx
    v = ((y - cy) * np.cos(angle) - (x - cx) * np.sin(angle)) / ry
    inside = 1 / (1 + np.exp((np.sqrt(u * u + v * v) - 1) * min(rx, ry) / rng.uniform(0.3, 1.5)))
    shade = 1 + rng.uniform(0.1, 0.4) * np.clip((u + v) / 2, -1, 1)
    colour = _colour(rng, hue, 0.15) * shade[..., None]
    image = image * (1 - inside[..., None]) + colour * inside[..., None]
  # Texture (coarse and fine brightness variation), then mild per-pixel noise.
  texture = (_upsample(rng.normal(0, 1, (8, 8, 1)), size)
             + 0.5 * _upsample(rng.normal(0, 1, (16, 16, 1)), size))
  image = image * (1 + 0.1 * texture) + rng.normal(0, 0.01, image.shape)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def make_image_folder(root, per_class, classes=CIFAR10_CLASSES, seed=0):
  """Writes natural-like 32x32 JPEGs (quality 75, as the CIFAR-10 JPEG release) as
  root/<split>/<class>/NNNN.jpg, `per_class` = {split: images per class}; returns root.
  Deterministic for a seed; class c's colours centre on hue c / len(classes)."""
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for c, name in enumerate(classes):
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        Image.fromarray(natural_image(rng, c / len(classes))).save(folder / f"{i:04d}.jpg",
                                                                     quality=75)
  return root


def make_cifar_archive(path, per_class, classes=CIFAR10_CLASSES, fine=False, seed=0):
  """Writes `path` in the layout of CIFAR's official Python archives (cifar-10-python.tar.gz;
  with `fine`, cifar-100-python.tar.gz): pickled dicts (protocol 2 and bytes keys, as the
  originals, which Python 2 wrote) with b'data' uint8 (N, 3072), each row the 32x32 red plane,
  then green, then blue, b'labels' (b'fine_labels'), b'batch_label', and a meta file with the
  class names. per_class: {'train': n, 'test': n}; CIFAR-10's train split is spread over
  data_batch_1..5. Returns {split: (uint8 images (N, 32, 32, 3), labels)} in the archive's
  order."""
  rng = np.random.default_rng(seed)
  top, meta, names_key, labels_key = (
      ("cifar-100-python", "meta", b"fine_label_names", b"fine_labels") if fine else
      ("cifar-10-batches-py", "batches.meta", b"label_names", b"labels"))
  files = {meta: {names_key: [c.encode() for c in classes]}}
  arrays = {}
  for split, n in per_class.items():
    labels = np.tile(np.arange(len(classes)), n)
    images = np.stack([natural_image(rng, c / len(classes)) for c in labels])
    arrays[split] = (images, labels)
    data = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
    parts = [("test" if fine else "test_batch", slice(None))] if split == "test" else (
        [("train", slice(None))] if fine else
        [(f"data_batch_{i + 1}", slice(i, None, 5)) for i in range(5)])
    for name, rows in parts:
      files[name] = {b"batch_label": name.encode(), labels_key: labels[rows].tolist(),
                     b"data": data[rows]}
  order = np.concatenate([np.arange(len(arrays["train"][1]))[slice(i, None, 5)]
                          for i in range(5)]) if not fine else slice(None)
  arrays["train"] = tuple(a[order] for a in arrays["train"])
  with tarfile.open(path, "w:gz") as tar:
    directory = tarfile.TarInfo(top)
    directory.type = tarfile.DIRTYPE
    tar.addfile(directory)
    for name, content in files.items():
      data = pickle.dumps(content, protocol=2)
      info = tarfile.TarInfo(f"{top}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return arrays


@pytest.fixture(autouse=True)
def _no_compile_cache_after_a_test():
  """A run (train.train, compile_cache.enable) turns JAX's persistent compilation cache on for
  the rest of its process; the tests after it in that pytest worker then compiled through the
  cache, and XLA:CPU's 8-device all-reduce of the linear probe's step aborted in its rendezvous
  ("only 7 of them arrived") in 3 of 6 runs with a cache directory, 0 of 5 without: the order
  dependence of issue 30, item 10. Each test starts with the cache as the session began."""
  before = jax.config.jax_compilation_cache_dir
  yield
  if jax.config.jax_compilation_cache_dir != before:
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()  # JAX remembers it used the cache until reset


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
  """A class-folder tree root/{train,test}/<class>/NNNN.jpg laid out as a slice of CIFAR-10 (its
  10 class names, 20 train and 10 test 32x32 RGB JPEGs a class), generated (~0.3 s), so the
  tests need no data outside the repository; tests/test_real_data.py reads the real one."""
  return make_image_folder(tmp_path_factory.mktemp("cifar10"), {"train": 20, "test": 10})

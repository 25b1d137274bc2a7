"""Optional checks on the real CIFAR-10 JPEG test archive, ../shared/data/cifar10/ beside the
repository (read only: slices are copied into tmp); they skip where it is absent. The rest of
the suite runs on generated images (conftest.cifar_root)."""
import pathlib
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sce_jax.data import sources
from sce_jax.data.images import decode
from tests import test_augment
from tests.conftest import CIFAR10_CLASSES

REAL_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
TEST = REAL_DIR / "cifar10_jpg_test.tar.gz"  # 10,000 images; the 50,000 of train add nothing.


def _need_real_data():
  if not TEST.is_file():
    pytest.skip(f"real CIFAR-10 not found at {REAL_DIR}; optional real-data check")


def _extract_slice(archive, dest, per_class):
  """Copies the first `per_class` images of each class (archive order) out of `archive`."""
  counts = {}
  with tarfile.open(archive) as tar:
    for member in tar:
      if not member.isfile():
        continue
      parts = pathlib.PurePosixPath(member.name).parts  # split/class/file
      if counts.get(parts[-2], 0) >= per_class:
        continue
      counts[parts[-2]] = counts.get(parts[-2], 0) + 1
      target = dest.joinpath(*parts)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(tar.extractfile(member).read())


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
  """root/test/<class>/*.jpg: the first 10 test images of each class."""
  _need_real_data()
  root = tmp_path_factory.mktemp("real_cifar10")
  _extract_slice(TEST, root, 10)
  return root


@pytest.fixture(scope="module")
def images(real_root):
  """20 real CIFAR-10 test images (two per class), as test_augment's `images`."""
  files = sorted(real_root.glob("test/*/*.jpg"))[::5]
  pil = [Image.open(f).convert("RGB") for f in files]
  return pil, jnp.asarray(np.stack([np.asarray(im) for im in pil]), jnp.float32) / 255


def test_colour_ops_match_pillow_on_real_images(images):
  """test_augment's colour checks, same assertions and MAX_MAE, on real CIFAR-10 images."""
  for op, enhance in test_augment.BLEND_OPS:
    for factor in test_augment.FACTORS:
      test_augment.test_blend_ops_match_pillow(images, op, enhance, factor)
  for delta in test_augment.HUE_DELTAS:
    test_augment.test_hue_matches_pillow_hsv(images, delta)
  test_augment.test_grayscale_matches_pillow(images)


def test_folder_source_reads_the_archive():
  """The test archive through the folder source: CIFAR-10's 10 classes, 1,000 images each,
  32x32 RGB JPEGs - the layout conftest.cifar_root imitates."""
  _need_real_data()
  folder = sources.ImageFolder(TEST, "test")
  assert folder.classes == list(CIFAR10_CLASSES)
  assert len(folder) == 10_000 and np.bincount(folder.labels).tolist() == [1000] * 10
  assert all(p.endswith(".jpg") for p in folder.paths)
  image = decode(folder[0])
  assert image.mode == "RGB" and image.size == (32, 32)

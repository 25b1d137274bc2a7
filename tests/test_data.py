"""Host input pipelines (tf.data, grain), sources, the trainer's entry points (docs/SCE.md 6-7)."""
import importlib
import gzip
import io
import math
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import tarfile
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from sce_jax import train
from sce_jax.data import archive_cache
from sce_jax.data import augment
from sce_jax.data import crop
from sce_jax.data import folders
from sce_jax.data import grain_pipeline
from sce_jax.data import images
from sce_jax.data import pipeline
from sce_jax.data import presets
from sce_jax.data import sources
from tests.conftest import CIFAR10_CLASSES, make_cifar_archive
from tests.helpers import load_config

LOADERS = ("tf", "grain")
WHOLE = presets.ViewSpec(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # The crop is the image.


@pytest.fixture(scope="module")
def sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, P("data"))


def _cfg(**overrides):
  cfg = dict(source="folder", name="", path="", eval_path="", data_dir=None, train_split="train",
             eval_split="test", image_size=32, loader="auto", shuffle_buffer=64, num_workers=0,
             prefetch=2, cache=False, strict=False, eval_resize=0, eval_interpolation="bilinear",
             host_stage="crops", decode_size=512, labels="auto", cache_dir="")
  return ml_collections.ConfigDict({**cfg, **overrides})


def _take(iterator, n):
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.086, 0.429)])
@pytest.mark.parametrize("host", LOADERS)
def test_host_crop_window_law(host, scale):
  """10,000 host crop windows of a 350x400 image: area within `scale` and covering it."""
  shape, ratio, n = (350, 400), (3 / 4, 4 / 3), 10_000
  if host == "tf":
    tf = pytest.importorskip("tensorflow")
    from sce_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
    ds = tf.data.Dataset.range(n).map(lambda i: tf_pipeline.distorted_window(
        tf.stack([tf.constant(0, tf.int64), i]), (*shape, 3), scale, ratio)[1])
    h, w = next(ds.batch(n).as_numpy_iterator()).T[:2]
  else:
    _, _, h, w = crop.crop_window(np.random.default_rng(0).random((n, crop.ATTEMPTS, 4)),
                                  *shape, scale, ratio)
  area = h * w / np.prod(shape)
  assert scale[0] - 0.005 <= area.min() < scale[0] + 0.01
  assert scale[1] - 0.02 < area.max() <= scale[1] + 0.005
  assert np.histogram(area, 4)[0].min() > n / 20  # Covers the whole range.


def _torchvision_window(u, height, width, scale, ratio):
  """torchvision's RandomResizedCrop.get_params, line by line, its random draws taken from u
  (ATTEMPTS, 4): uniform_(a, b) is a + u (b - a), randint(0, n) is floor(u n)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for u_area, u_ratio, u_top, u_left in u:
    target_area = area * (scale[0] + u_area * (scale[1] - scale[0]))
    aspect_ratio = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
  in_ratio = float(width) / float(height)  # Fallback to central crop.
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _tf_windows(tf, n, shape, scale, ratio):
  """(uniforms (n, ATTEMPTS, 4), windows (n, 4)) of n tf.data crops (seeds (0, i)) of an image
  of `shape`, traced as the pipeline's, without a static shape."""
  from sce_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top

  @tf.function(input_signature=[tf.TensorSpec([3], tf.int32)])
  def draw(image_shape):
    seeds = tf.stack([tf.zeros([n], tf.int64), tf.range(n, dtype=tf.int64)], axis=1)
    u = tf.vectorized_map(lambda s: tf.random.stateless_uniform(
        [crop.ATTEMPTS, 4], s, dtype=tf.float64), seeds)
    begin_size = tf.vectorized_map(lambda s: tf.concat(
        tf_pipeline.distorted_window(s, image_shape, scale, ratio), 0), seeds)
    return u, tf.gather(begin_size, [0, 1, 3, 4], axis=1)
  return tuple(a.numpy() for a in draw(tf.constant([*shape, 3])))


@pytest.mark.parametrize("shape", [(375, 500), (32, 32), (3, 500), (500, 3)])
@pytest.mark.parametrize("host", LOADERS)
def test_host_crop_window_is_torchvisions(host, shape):
  """The host paths' windows are torchvision's, draw by draw, from the same uniforms: ImageNet-
  and CIFAR-like images, and two that take each branch of the fallback. (The device path
  computes in float32 and agrees in law: test_crop_paths_share_one_law.)"""
  n, scale, ratio = 1000, (0.2, 1.0), (3 / 4, 4 / 3)
  if host == "tf":
    u, ours = _tf_windows(pytest.importorskip("tensorflow"), n, shape, scale, ratio)
  else:
    u = np.random.default_rng(0).random((n, crop.ATTEMPTS, 4))
    ours = np.stack(crop.crop_window(u, *shape, scale, ratio), axis=-1)
  want = np.array([_torchvision_window(x, *shape, scale, ratio) for x in u])
  np.testing.assert_array_equal(ours, want)


def _ks_statistic(a, b):
  """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
  grid = np.union1d(a, b)
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
  return np.abs(cdf(a) - cdf(b)).max()


# (image shape, scale): ImageNet-like images at the global and the four local crop scales of
# the multi-crop run, CIFAR's 32x32 at its scale.
_LAW_CASES = ([((375, 500), s) for s in dict.fromkeys(
    v.scale for v in presets.imagenet_multi_crop())] + [((32, 32), presets.cifar(32)[0].scale)])


@pytest.mark.parametrize("shape,scale", _LAW_CASES)
@pytest.mark.parametrize("path", ["tf", "device"])
def test_crop_paths_share_one_law(path, shape, scale):
  """10,000 windows of tf.data's or the device's crop against 10,000 of grain's (torchvision's
  law, test_host_crop_window_is_torchvisions): every window lies in the image, and the area
  fraction and the log aspect ratio agree.

  Means: within 5 sigma of their difference, sigma = sqrt(var_a / n + var_b / n) (a false alarm
  once in 1.7e6). Quantiles: the two-sample KS statistic, the largest gap between the empirical
  CDFs (so each quantile of one sample is a quantile of the other within that gap), below its
  level at alpha = 1e-6, sqrt(-ln(alpha / 2) / 2) * sqrt(2 / n) = 0.038. TF's own law
  (sample_distorted_bounding_box) fails every case: at scale (0.2, 1), a mean area of 0.457
  against 0.495 of a 375x500 image (15 sigma) and 0.495 against 0.551 of a 32x32 one.
  """
  n, ratio = 10_000, (3 / 4, 4 / 3)
  if path == "tf":
    _, windows = _tf_windows(pytest.importorskip("tensorflow"), n, shape, scale, ratio)
    top, left, h, w = windows.T
  else:
    top, left, h, w = map(np.asarray, jax.jit(augment.crop_windows, static_argnums=range(1, 6))(
        jax.random.key(0), n, *shape, scale, ratio))
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= shape[0]).all() and (left + w <= shape[1]).all()
  _, _, gh, gw = crop.crop_window(np.random.default_rng(0).random((n, crop.ATTEMPTS, 4)),
                                  *shape, scale, ratio)
  laws = lambda h, w: {"area": h * w / np.prod(shape), "log aspect": np.log(w / h)}
  for name, a in laws(h, w).items():
    b = laws(gh, gw)[name]
    sigma = np.sqrt(a.var() / n + b.var() / n)
    assert abs(a.mean() - b.mean()) < 5 * sigma, (name, a.mean(), b.mean(), sigma)
    assert _ks_statistic(a, b) < np.sqrt(-np.log(1e-6 / 2) / 2) * np.sqrt(2 / n), name


def _identify(seen, folder):
  """Index in `folder` of each image in `seen` (TF and Pillow decode JPEG ~1/255 apart)."""
  decoded = np.stack([np.asarray(images.decode(folder[i])) for i in range(len(folder))])
  distance = np.abs(seen[:, None].astype(np.float32) - decoded[None].astype(np.float32))
  distance = distance.mean(axis=(2, 3, 4))
  assert distance.min(axis=1).max() < 3.0  # Each one is an image of the folder, uncropped.
  return distance.argmin(axis=1)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("loader", LOADERS)
def test_folder_train_iterator(cifar_root, sharding, loader, cache):
  """Shapes, dtypes, labels, an epoch is a permutation, determinism, and resume at a step."""
  cfg = _cfg(path=str(cifar_root), loader=loader, cache=cache)
  views = (WHOLE, presets.cifar(32)[1])
  folder = sources.ImageFolder(cifar_root, "train")
  make = lambda seed=0, start_step=0: pipeline.train_iterator(
      folder, cfg, global_batch_size=16, views=views, seed=seed, start_step=start_step,
      sharding=sharding)
  batches = _take(make(), 14)  # 200 images: an epoch is 12.5 batches.
  first = next(make())
  assert first["label"].sharding == sharding and first["views"][1].sharding == sharding
  batch = batches[0]
  assert [v.shape for v in batch["views"]] == [(16, 32, 32, 3)] * 2
  assert all(v.dtype == np.uint8 for v in batch["views"]) and batch["label"].dtype == np.int32

  index = _identify(np.concatenate([b["views"][0] for b in batches[:12]]), folder)
  assert len(set(index)) == len(index)  # No image twice within an epoch.
  np.testing.assert_array_equal(
      folder.labels[index], np.concatenate([b["label"] for b in batches[:12]]))

  assert _equal(first, batches[0])  # Deterministic for a seed.
  assert not _equal(next(make(seed=1)), batches[0])
  for step in (3, 13):  # Inside the first epoch, and in the second.
    assert _equal(_take(make(start_step=step), 1)[0], batches[step])


@pytest.mark.parametrize("loader", LOADERS)
def test_tfds_train_iterator(sharding, loader, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  # mock_data leaves the dataset unprepared, so sources.Tfds first probes TFDS's download host;
  # a test has no network.
  monkeypatch.setattr(socket, "create_connection", lambda address, timeout: io.BytesIO())
  cfg = _cfg(source="tfds", name="cifar10", loader=loader)
  with tfds.testing.mock_data(num_examples=40):
    splits = sources.Splits(cfg)
    batches = _take(pipeline.train_iterator(
        splits.train, cfg, global_batch_size=16, views=presets.get("cifar", 32), seed=0,
        sharding=sharding), 3)
    assert splits.num_classes == 10
  for batch in batches:
    assert [v.shape for v in batch["views"]] == [(16, 32, 32, 3)] * 2
    assert batch["views"][0].dtype == np.uint8 and batch["label"].dtype == np.int32
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


@pytest.mark.parametrize("loader", LOADERS)
def test_eval_sees_every_example_once(cifar_root, sharding, loader):
  """100 test images, global batch 16 over 8 devices: 7 batches, the last ragged and masked."""
  cfg = _cfg(path=str(cifar_root), loader=loader)
  splits = sources.Splits(cfg)
  batches = list(pipeline.eval_iterator(splits.eval, cfg, global_batch_size=16,
                                        sharding=sharding))
  assert len(batches) == 7 and batches[0]["image"].sharding == sharding
  batches = [jax.tree.map(np.asarray, b) for b in batches]
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 100 and not mask[100:].any()
  seen = np.concatenate([b["image"] for b in batches])[mask]
  labels = np.concatenate([b["label"] for b in batches])[mask]
  index = _identify(seen, splits.eval)
  assert sorted(index) == list(range(100))
  np.testing.assert_array_equal(splits.eval.labels[index], labels)
  assert splits.eval.num_examples == 100 and splits.num_classes == 10


@pytest.mark.parametrize("loader", LOADERS)
def test_processes_share_the_data(cifar_root, loader):
  """Two processes (host level): evaluation covers the split once with as many batches on
  each; training epochs are disjoint shares."""
  module = importlib.import_module(f"sce_jax.data.{loader}_pipeline")
  cfg = _cfg(path=str(cifar_root), loader=loader)
  splits = sources.Splits(cfg)
  # pipeline.eval_iterator's count: ceil(ceil(100 / 2 processes) / 8) = 7 batches each.
  evals = [list(module.eval_batches(splits.eval, cfg, batch_size=8, num_batches=7,
                                    process_index=i, process_count=2)) for i in range(2)]
  assert len(evals[0]) == len(evals[1]) == 7
  seen = np.concatenate([b["image"][b["mask"]] for batches in evals for b in batches])
  assert sorted(_identify(seen, splits.eval)) == list(range(100))
  train = [module.train_batches(splits.train, cfg, views=(WHOLE,), batch_size=10, seed=0,
                                start_step=0, process_index=i, process_count=2)
           for i in range(2)]
  seen = np.concatenate([next(it)["views"][0] for it in train for _ in range(10)])
  index = _identify(seen, splits.train)
  assert sorted(index) == list(range(200))


def test_grain_workers_do_not_change_batches(cifar_root, sharding):
  folder = sources.ImageFolder(cifar_root, "train")
  make = lambda workers: pipeline.train_iterator(
      folder, _cfg(loader="grain", num_workers=workers), global_batch_size=16,
      views=presets.get("cifar", 32), seed=0, sharding=sharding)
  in_process, workers = make(0), make(2)
  assert all(_equal(a, b) for a, b in zip(_take(in_process, 3), _take(workers, 3)))
  workers.close()


def test_grain_crops_by_stream_position(cifar_root, tmp_path):
  """The crops of the example at stream position p come from crop_rng(seed, process, p): with
  one photograph in each process's share, batch `step` holds crop_views of it at positions
  step * B + i, from the start and resumed."""
  (tmp_path / "c0").mkdir()
  photo = Image.open(sorted(cifar_root.glob("train/*/*.jpg"))[0]).resize((200, 150), Image.BICUBIC)
  for i in range(2):  # Process 1 of 2 reads the second copy.
    photo.save(tmp_path / "c0" / f"{i}.jpg", quality=90)
  folder = sources.ImageFolder(tmp_path)
  views = presets.imagenet_two_crop(48)  # Windows of >= 96 px decode at 1/2 scale.
  for step in (0, 3):
    batch = next(grain_pipeline.train_batches(folder, _cfg(), views=views, batch_size=4, seed=5,
                                              start_step=step, process_index=1, process_count=2))
    for i in range(4):
      crops, _ = grain_pipeline.crop_views(
          folder[0], grain_pipeline.crop_rng(5, 1, step * 4 + i), views)
      assert all(np.array_equal(batch["views"][v][i], crops[v]) for v in range(2))
  assert len({v.tobytes() for v in batch["views"][0]}) == 4  # A new crop at each position.


def test_tf_decodes_jpeg_as_pillow(cifar_root):
  """tf.data's JPEG decode uses Pillow's IDCT: the photographs agree with Pillow's decode."""
  tf = pytest.importorskip("tensorflow")
  from sce_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
  decode = tf_pipeline._decode  # pylint: disable=protected-access
  folder = sources.ImageFolder(cifar_root, "test")
  for i in range(0, 100, 10):
    ours = decode(tf.constant(folder[i]["image"])).numpy()
    # Both are libjpeg-turbo's accurate integer IDCT (bit-identical here); the fast IDCT, TF's
    # default, is ~0.75 grey levels off on photographs, so 0.1 tells the two apart.
    assert np.abs(ours.astype(int) - np.asarray(images.decode(folder[i]), int)).mean() < 0.1


def test_tf_shuffles_a_folder_by_name(cifar_root):
  """tf.data's uncached epoch shuffle holds a folder's file names, not its bytes (a shuffle
  over an ImageNet folder would hold ~140 GB): the records shuffled are names, the stream
  reads each file after the shuffle."""
  pytest.importorskip("tensorflow")
  from sce_jax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
  cfg = _cfg(path=str(cifar_root), loader="tf", cache=False)
  folder = sources.ImageFolder(cifar_root, "train")
  records = tf_pipeline._records(folder, cfg, 0, 1, train=True)  # pylint: disable=protected-access
  assert all(ex["image"] == ex["name"] for ex in records.take(3).as_numpy_iterator())
  stream = tf_pipeline._stream(  # pylint: disable=protected-access
      folder, cfg, 0, 1, seed=0, key=[0, 0], start=0)
  for ex in stream.take(3).as_numpy_iterator():
    assert ex["image"] == pathlib.Path(ex["name"].decode()).read_bytes()


@pytest.fixture(scope="module")
def large_root(cifar_root, tmp_path_factory):
  """ImageNet-like JPEGs: 12 CIFAR images upscaled to 300x220 and 220x300, two classes."""
  root = tmp_path_factory.mktemp("large")
  for i, path in enumerate(sorted(cifar_root.glob("test/*/*.jpg"))[:12]):
    size = (300, 220) if i % 2 else (220, 300)
    (root / f"c{i % 2}").mkdir(exist_ok=True)
    Image.open(path).resize(size, Image.BICUBIC).save(root / f"c{i % 2}" / f"{i}.jpg", quality=95)
  return root


def test_eval_resize_and_centre_crop(large_root, sharding):
  """ImageNet-size evaluation (resize 256/224 + centre crop) agrees between the two loaders and
  with Pillow."""
  folder = sources.ImageFolder(large_root, "test")
  out = {loader: next(pipeline.eval_iterator(
      folder, _cfg(image_size=128, loader=loader), global_batch_size=16,
      sharding=sharding)) for loader in LOADERS}
  ref = np.stack([grain_pipeline.center_crop(images.decode(folder[i]), 128)
                  for i in range(len(folder))])
  for loader, batch in out.items():
    image = np.asarray(batch["image"], np.float32)[np.asarray(batch["mask"])]
    assert image.shape == (12, 128, 128, 3), loader
    assert np.abs(image - ref).mean() < 2.0, loader
  assert crop.eval_geometry(220, 300, 224) == ((256, 349), (16, 62))


def test_eval_resize_to_the_crop_bicubic(large_root, sharding):
  """data.eval_resize and eval_interpolation (the transfer protocol's bicubic resize of the
  shorter side to the crop, docs/SCE.md 9): both loaders agree with Pillow's bicubic, and the
  crop is not the default 256/224 one."""
  folder = sources.ImageFolder(large_root, "test")
  ref = np.stack([grain_pipeline.center_crop(images.decode(folder[i]), 128, 128, "bicubic")
                  for i in range(len(folder))]).astype(np.float32)
  default = np.stack([grain_pipeline.center_crop(images.decode(folder[i]), 128)
                      for i in range(len(folder))]).astype(np.float32)
  assert np.abs(ref - default).mean() > 5.0  # another window of the image, not a filter change
  for loader in LOADERS:
    batch = next(pipeline.eval_iterator(
        folder, _cfg(image_size=128, eval_resize=128, eval_interpolation="bicubic",
                     loader=loader), global_batch_size=16, sharding=sharding))
    image = np.asarray(batch["image"], np.float32)[np.asarray(batch["mask"])]
    # TF's antialiased Keys cubic and Pillow's bicubic (both a = -0.5) differ by rounding, well
    # under a grey level on average; 2.0 as the bilinear test above.
    assert np.abs(image - ref).mean() < 2.0, loader
  assert crop.eval_geometry(220, 300, 224, resize=224) == ((224, 305), (0, 40))


def test_train_iterator_without_tensorflow(cifar_root):
  """With TensorFlow unimportable, the folder path runs on grain; TFDS gives a clear error."""
  script = textwrap.dedent(f"""
      import sys
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError("blocked " + name)
      sys.meta_path.insert(0, Block())
      import jax, ml_collections
      from jax.sharding import NamedSharding, PartitionSpec as P
      from sce_jax.data import images, pipeline, presets, sources
      cfg = ml_collections.ConfigDict(dict(
          source="folder", name="", path={str(cifar_root)!r}, eval_path="", data_dir=None,
          train_split="train", eval_split="test", image_size=32, loader="auto",
          shuffle_buffer=64, num_workers=0, prefetch=2, cache=False, strict=False,
          labels="auto", host_stage="crops", decode_size=512, cache_dir=""))
      sharding = NamedSharding(jax.make_mesh((1,), ("data",)), P("data"))
      batch = next(pipeline.train_iterator(sources.Splits(cfg).train, cfg, global_batch_size=8,
                                           views=presets.get("cifar", 32), seed=0,
                                           sharding=sharding))
      print([v.shape for v in batch["views"]], batch["label"].dtype)
      assert "tensorflow" not in sys.modules
      cfg.source, cfg.name = "tfds", "cifar10"
      try:
        sources.Splits(cfg)
      except images.DataError as e:
        print("tfds:", e)
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "[(8, 32, 32, 3), (8, 32, 32, 3)] int32" in result.stdout
  assert "tfds: source='tfds' needs tensorflow" in result.stdout


def test_memory_source_on_grain(sharding):
  rng = np.random.default_rng(0)
  arrays = {"train": (rng.integers(0, 256, (40, 32, 32, 3), np.uint8), np.arange(40) % 4),
            "test": (rng.integers(0, 256, (20, 32, 32, 3), np.uint8), np.arange(20) % 4)}
  cfg = _cfg(source="memory")
  cfg.arrays = arrays
  splits = sources.Splits(cfg)
  batch = next(pipeline.train_iterator(splits.train, cfg, global_batch_size=8, views=(WHOLE,),
                                       seed=0, sharding=sharding))
  index = [next(i for i in range(40) if np.array_equal(v, arrays["train"][0][i]))
           for v in np.asarray(batch["views"][0])]
  np.testing.assert_array_equal(np.asarray(batch["label"]), arrays["train"][1][index])
  assert splits.eval.num_examples == 20 and splits.num_classes == 4
  with pytest.raises(ValueError, match="loader=grain"):
    next(pipeline.train_iterator(splits.train, _cfg(loader="tf"), global_batch_size=8,
                                 views=(WHOLE,), seed=0, sharding=sharding))


def test_archive_and_eval_path(cifar_root, tmp_path):
  """A .tar.gz of split folders reads like the folder; the test archive is found from the
  train archive's name; a folder's eval split from its subfolders."""
  for split in ("train", "test"):
    with tarfile.open(tmp_path / f"slice_{split}.tar.gz", "w:gz") as tar:
      tar.add(cifar_root / split, arcname=split)
  train = tmp_path / "slice_train.tar.gz"
  archive = sources.ImageFolder(train, "train")
  folder = sources.ImageFolder(cifar_root, "train")
  assert archive.classes == folder.classes and len(archive) == len(folder) == 200
  assert archive[7]["image"] == folder[7]["image"] and archive[7]["label"] == folder[7]["label"]
  assert not str(archive.root).startswith(str(tmp_path))  # Unpacked elsewhere.
  assert folders.find_eval_path(train, "test") == tmp_path / "slice_test.tar.gz"
  assert folders.find_eval_path(cifar_root, "test") == cifar_root / "test"
  (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
  (tmp_path / "tree" / "val" / "a").mkdir(parents=True)
  assert folders.find_eval_path(tmp_path / "tree", "test") == tmp_path / "tree" / "val"
  assert len(sources.ImageFolder(folders.find_eval_path(train, "test"), "test")) == 100


def test_clear_errors(tmp_path, cifar_root):
  with pytest.raises(images.DataError, match="dataset not found at .*data.path"):
    sources.ImageFolder(tmp_path / "missing")
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="no .* images"):
    sources.ImageFolder(tmp_path / "empty")
  bad = tmp_path / "bad" / "cls" / "broken.jpg"
  bad.parent.mkdir(parents=True)
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
    images.decode(sources.ImageFolder(tmp_path / "bad")[0])
  with pytest.raises(images.DataError, match="eval_path"):
    folders.find_eval_path(cifar_root / "train", "test")


@pytest.fixture(scope="module")
def archives(cifar_root, tmp_path_factory):
  """slice_train.tar.gz and slice_test.tar.gz of cifar_root's splits."""
  root = tmp_path_factory.mktemp("archives")
  for split in ("train", "test"):
    with tarfile.open(root / f"slice_{split}.tar.gz", "w:gz") as tar:
      tar.add(cifar_root / split, arcname=split)
  return root


def test_archive_cache(archives, cifar_root, tmp_path, monkeypatch):
  """A fixed-size archive opens as arrays equal to the decoded folder, in the folder's order;
  the second open reads the cache; a changed archive is decoded again."""
  cfg = _cfg(path=str(archives / "slice_train.tar.gz"), cache_dir=str(tmp_path / "cache"))
  splits = sources.Splits(cfg)
  folder = sources.ImageFolder(cifar_root, "train")
  cached = splits.train
  assert isinstance(cached, sources.InMemory) and cached.classes == folder.classes
  np.testing.assert_array_equal(cached.labels, folder.labels)
  np.testing.assert_array_equal(
      cached.images, np.stack([np.asarray(images.decode(folder[i])) for i in range(200)]))
  assert splits.eval.num_examples == 100 and splits.num_classes == 10
  entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
  assert len(entries) == 2 and not any(e.startswith(".") for e in entries)  # No temp folders.
  archive = archives / "slice_train.tar.gz"
  cfg.path = str(archive)
  with monkeypatch.context() as patch:
    patch.setattr(archive_cache, "_decode_archive", None)  # A second open must not decode.
    np.testing.assert_array_equal(sources.Splits(cfg).train.images, cached.images)
  changed = tmp_path / "changed.tar.gz"
  changed.write_bytes(archive.read_bytes())
  archive_cache.read(changed, "train", tmp_path / "cache")
  os.utime(changed, (changed.stat().st_atime, changed.stat().st_mtime + 10))
  archive_cache.read(changed, "train", tmp_path / "cache")
  assert len(list((tmp_path / "cache").glob("changed.tar.gz.train.*"))) == 2


def test_archive_cache_built_by_two_processes_at_once(archives, tmp_path):
  """Two processes that decode the same archive at once both read a whole, correct cache. Each
  holds its decoded copy until the other has decoded its own too (a barrier of two files), so
  both renames race for the same entry: the race the cache must survive."""
  barrier = tmp_path / "barrier"
  barrier.mkdir()
  script = textwrap.dedent(f"""
      import os, pathlib, sys, time
      import numpy as np
      from sce_jax.data import archive_cache
      decode = archive_cache._decode_archive
      def after_both(*args):
        done = decode(*args)
        barrier = pathlib.Path({str(barrier)!r})
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(list(barrier.iterdir())) < 2:
          if time.time() > deadline:
            sys.exit("the other process never decoded")
          time.sleep(0.01)
        return done
      archive_cache._decode_archive = after_both
      images, labels, _ = archive_cache.read({str(archives / "slice_train.tar.gz")!r}, "train",
                                             {str(tmp_path / "cache")!r})
      print(int(np.asarray(images, np.int64).sum()), labels.tolist() == sorted(labels.tolist()))
      """)
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [proc.communicate(timeout=120) for proc in procs]
  assert all(proc.returncode == 0 for proc in procs), outputs
  assert len(list(barrier.iterdir())) == 2  # both decoded before either renamed
  images, _, _ = archive_cache.read(archives / "slice_train.tar.gz", "train", tmp_path / "cache")
  for out, _ in outputs:
    assert out.split() == [str(int(np.asarray(images, np.int64).sum())), "True"]
  assert [p.name[:24] for p in (tmp_path / "cache").iterdir()] == ["slice_train.tar.gz.train"]


def test_archive_of_several_sizes_is_unpacked(large_root, tmp_path):
  """Images of several sizes (ImageNet) are not cached: the archive is unpacked and read as a
  folder."""
  with tarfile.open(tmp_path / "large_train.tar", "w") as tar:
    tar.add(large_root, arcname="train")
  assert archive_cache.read(tmp_path / "large_train.tar", "train", tmp_path / "cache") is None
  split = sources.Splits(_cfg(path=str(tmp_path / "large_train.tar"),
                              cache_dir=str(tmp_path / "cache"))).train
  assert isinstance(split, sources.ImageFolder) and len(split) == 12
  assert not list((tmp_path / "cache").iterdir())


BAD = ("x_flipped.jpg", "x_empty.jpg", "x_random.jpg")


@pytest.fixture(scope="module")
def damaged_root(cifar_root, tmp_path_factory):
  """Two classes of 8 good JPEGs a split, and in class 'a' of each split the three files a user
  meets: a JPEG with 64 flipped bytes, an empty file and random bytes."""
  root = tmp_path_factory.mktemp("damaged")
  rng = np.random.default_rng(0)
  good = sorted(cifar_root.glob("train/*/*.jpg"))
  for split in ("train", "test"):
    for c, name in enumerate("ab"):
      (root / split / name).mkdir(parents=True)
      for i in range(8):
        (root / split / name / f"{i}.jpg").write_bytes(good[20 * c + i].read_bytes())
    jpeg = bytearray(good[0].read_bytes())
    for i in rng.choice(np.arange(200, len(jpeg) - 10), 64, replace=False):
      jpeg[i] ^= 0xFF
    contents = (bytes(jpeg), b"", rng.bytes(500))
    for name, content in zip(BAD, contents):
      (root / split / "a" / name).write_bytes(content)
      with pytest.raises(images.UndecodableImage):
        images.decode({"image": content, "name": name})
  return root


def _skipped(caplog):
  return sorted(r.getMessage().split()[3].rsplit("/", 1)[-1] for r in caplog.records
                if r.getMessage().startswith("Skipped undecodable image "))


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("loader", LOADERS)
def test_undecodable_images_are_skipped(damaged_root, sharding, loader, cache, caplog):
  """Both loaders skip a corrupt JPEG, an empty file and random bytes, naming each once: in
  training another image of the batch stands in, so batches stay full and resuming stays exact;
  in evaluation they are left out. data.strict=True stops at the first one instead."""
  cfg = _cfg(path=str(damaged_root), loader=loader, cache=cache)
  splits = sources.Splits(cfg)
  good = np.stack([np.asarray(images.decode(splits.train[i])) for i in range(len(splits.train))
                   if not splits.train.paths[i].endswith(BAD)])
  make = lambda start_step=0: pipeline.train_iterator(
      splits.train, cfg, global_batch_size=8, views=(WHOLE,), seed=0, start_step=start_step,
      sharding=sharding)
  batches = _take(make(), 4)  # 19 files an epoch: every one met, some twice.
  assert _skipped(caplog) == sorted(BAD)
  seen = np.concatenate([b["views"][0] for b in batches]).astype(np.float32)
  distance = np.abs(seen[:, None] - good[None].astype(np.float32)).mean(axis=(2, 3, 4))
  assert distance.min(axis=1).max() < 3.0  # Every row is a good image (TF decodes ~1 apart).
  assert _equal(_take(make(start_step=3), 1)[0], batches[3])

  caplog.clear()
  batches = list(pipeline.eval_iterator(splits.eval, cfg, global_batch_size=8,
                                        sharding=sharding))
  assert sum(int(np.asarray(b["mask"]).sum()) for b in batches) == 16
  assert _skipped(caplog) == sorted(BAD)
  assert all("left out of the evaluation" in r.getMessage() for r in caplog.records)

  cfg.strict = True
  with pytest.raises(images.DataError, match=r"cannot decode image .*x_.*\.jpg; replace or "
                     r"remove it, or set --config.data.strict=False"):
    _take(make(), 4)


def test_empty_class_folder_and_a_file_for_data_path(cifar_root, tmp_path, caplog):
  """An empty class folder is left out with a warning, and the test split is labelled by the
  training split's classes; a class the test split has images of but the training split has
  none of (its folder there empty), or a data.path that is a plain file, are one-line
  errors. A run that evaluates opens the test split before anything is built."""
  good = sorted(cifar_root.glob("train/*/*.jpg"))
  for split in ("train", "test"):
    for name in ("a", "b", "c"):
      (tmp_path / split / name).mkdir(parents=True)
    for name, image in (("a", good[0]), ("c", good[30])):
      (tmp_path / split / name / "0.jpg").write_bytes(image.read_bytes())
  splits = sources.Splits(_cfg(path=str(tmp_path)))
  assert splits.train.classes == ["a", "c"] and splits.num_classes == 2
  assert f"Left out 1 class folder(s) of {tmp_path}/train that hold no" in caplog.text
  assert list(splits.eval.labels) == [0, 1]
  (tmp_path / "test" / "b" / "0.jpg").write_bytes(good[10].read_bytes())
  message = (f"{tmp_path}/test holds images of classes that the training split has no images "
             "of: b (1 images); add images of each to the training split, or take that folder "
             "out of this split.")
  with pytest.raises(images.DataError) as e:
    sources.Splits(_cfg(path=str(tmp_path))).open_eval()
  assert str(e.value) == message
  config = load_config("cifar10_r18", "smoke")
  config.data.path, config.eval.knn.every_epochs = str(tmp_path), 0  # kNN at the end
  config.batch_size = 2
  with pytest.raises(images.DataError) as e:
    train.train(config, tmp_path / "run")
  assert str(e.value) == message and not (tmp_path / "run").exists()
  (tmp_path / "notes.txt").write_text("not images")
  with pytest.raises(images.DataError, match=r"notes.txt is neither a \.tar, \.tar\.gz "
                     r"or \.tgz archive nor a list of images .* set --config.data.path"):
    sources.Splits(_cfg(path=str(tmp_path / "notes.txt")))


def test_damaged_archive_is_named(archives, tmp_path):
  """A .tar.gz cut short (a download that stopped) is a one-line DataError naming it, whether
  it would be cached as arrays or unpacked, before anything is built; tarfile's own error
  (EOFError) names no file."""
  whole = (archives / "slice_train.tar.gz").read_bytes()
  cut = tmp_path / "slice_train.tar.gz"
  cut.write_bytes(whole[:len(whole) // 2])
  expected = (f"{cut} is damaged or incomplete (EOFError: Compressed file ended before the "
              "end-of-stream marker was reached); download or copy it again (its size should "
              "match the original's).")
  for open_split in (lambda: sources.Splits(_cfg(path=str(cut), cache_dir=str(tmp_path / "c"))),
                     lambda: sources.ImageFolder(cut)):  # Cached, unpacked.
    with pytest.raises(images.DataError) as e:
      open_split()
    assert str(e.value) == expected
  cifar = tmp_path / "cifar-10-python.tar.gz"
  make_cifar_archive(cifar, {"train": 1, "test": 1})
  cifar.write_bytes(cifar.read_bytes()[:-200])
  with pytest.raises(images.DataError, match=rf"^{cifar} is damaged or incomplete \(EOFError"):
    sources.Splits(_cfg(path=str(cifar), cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("name", ["slice_train.tar.gz", "slice_train.tar"])
def test_archive_with_flipped_bytes_is_named(archives, tmp_path, name):
  """64 bytes flipped in the middle of an archive (its size unchanged): tarfile stops at the
  first unreadable header without a word, and a .tar.gz's CRC is only checked at its end, so
  the archive is read to its end before its contents are trusted. The error names the damaged
  training archive, not the intact test archive opened after it; nothing is cached."""
  whole = (archives / "slice_train.tar.gz").read_bytes()
  if name.endswith(".tar"):
    whole = gzip.decompress(whole)
  middle = len(whole) // 2
  damaged = tmp_path / name
  damaged.write_bytes(whole[:middle] + bytes(b ^ 0xFF for b in whole[middle:middle + 64])
                      + whole[middle + 64:])
  cfg = _cfg(path=str(damaged), eval_path=str(archives / "slice_test.tar.gz"),
             cache_dir=str(tmp_path / "cache"))
  for open_split in (lambda: sources.Splits(cfg).open_eval(),
                     lambda: sources.ImageFolder(damaged)):  # Cached, unpacked.
    with pytest.raises(images.DataError,
                       match=rf"^{damaged} is damaged or incomplete \(.*\); download or copy it "
                       r"again \(its size should match the original's\)\.$"):
      open_split()
  cache = tmp_path / "cache"
  assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("fine", [False, True])
def test_cifar_python_archive(fine, tmp_path, monkeypatch):
  """CIFAR's official Python archive (cifar-10-python.tar.gz, cifar-100-python.tar.gz) is one
  data.path for both splits: its pickled batches decoded into the array cache (each row the
  red, green and blue planes), the labels and class names as stored; a second start reads the
  cache."""
  classes = ("apple", "bear", "cloud") if fine else CIFAR10_CLASSES
  archive = tmp_path / ("cifar-100-python.tar.gz" if fine else "cifar-10-python.tar.gz")
  expected = make_cifar_archive(archive, {"train": 2, "test": 1}, classes, fine=fine)
  cfg = _cfg(path=str(archive), cache_dir=str(tmp_path / "cache"))
  splits = sources.Splits(cfg)
  assert isinstance(splits.train, sources.InMemory)
  for source, split in ((splits.train, "train"), (splits.open_eval(), "test")):
    np.testing.assert_array_equal(source.images, expected[split][0])
    np.testing.assert_array_equal(source.labels, expected[split][1])
    assert source.classes == list(classes)
  assert splits.train.images[0, 0, 0].tolist() == list(expected["train"][0][0, 0, 0])
  with monkeypatch.context() as patch:
    patch.setattr(archive_cache, "_decode_cifar", None)  # A second open must not decode.
    np.testing.assert_array_equal(sources.Splits(cfg).train.images, expected["train"][0])
  cfg.eval_split = "val"
  with pytest.raises(images.DataError, match=r"holds the splits 'train', 'test', not 'val'; set "
                     r"--config.data.train_split / eval_split to them\.$"):
    sources.Splits(cfg).open_eval()


class _Planted:
  """A pickle that runs a command when loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_cifar_archive_runs_no_code(tmp_path):
  """A CIFAR batch is data: a pickle that names anything but plain values and NumPy arrays (here
  os.system) is refused, not run."""
  marker = tmp_path / "ran"
  archive = tmp_path / "cifar-10-python.tar.gz"
  members = {"batches.meta": {b"label_names": [b"a", b"b"]}, "data_batch_1": _Planted(marker)}
  with tarfile.open(archive, "w:gz") as tar:
    for name, content in members.items():
      data = pickle.dumps(content)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  with pytest.raises(images.DataError, match=r"cannot read cifar-10-batches-py/data_batch_1 "
                     r"\(UnpicklingError: posix.system has no place in a CIFAR batch\)"):
    sources.Splits(_cfg(path=str(archive), cache_dir=str(tmp_path / "cache")))
  assert not marker.exists()


def test_truncated_jpeg_is_skipped_quietly(cifar_root, tmp_path, sharding, capfd, caplog):
  """A JPEG cut short in its headers (a truncated copy) is skipped with our one warning, and
  libjpeg's own lines ('Improper call to JPEG library in state 201', 'Input file read error'),
  which it prints straight to stderr whatever TF's log level, do not appear: the tf.data loader
  does not hand it to libjpeg."""
  pytest.importorskip("tensorflow")
  good = sorted(cifar_root.glob("train/*/*.jpg"))
  for c, name in enumerate("ab"):
    (tmp_path / "train" / name).mkdir(parents=True)
    for i in range(4):
      (tmp_path / "train" / name / f"{i}.jpg").write_bytes(good[20 * c + i].read_bytes())
  jpeg = good[0].read_bytes()
  scan = jpeg.index(b"\xff\xda")
  for cut in (scan // 2, scan + 3, scan + 12):  # In the tables, in and at the end of the
    (tmp_path / "train" / "a" / f"x_{cut}.jpg").write_bytes(jpeg[:cut])  # scan header.
  cfg = _cfg(path=str(tmp_path), loader="tf")
  splits = sources.Splits(cfg)
  _take(pipeline.train_iterator(splits.train, cfg, global_batch_size=8, views=(WHOLE,), seed=0,
                                sharding=sharding), 3)
  assert len(_skipped(caplog)) == 3
  err = capfd.readouterr().err
  assert "JPEG library" not in err and "Input file read error" not in err, err

"""The data a run reads: one source per split, opened once from the data config.

A source has `__len__` and `__getitem__(i) -> {'image', 'label'}` (grain's RandomAccessDataSource
protocol), and knows its `num_examples` and `num_classes`. 'image' is encoded bytes
(`ImageFolder`, whose records also hold the file's 'name'), or a decoded uint8 (H, W, 3) array
(`InMemory`, `Tfds`); `decode` turns either into a PIL image, and `decode_or_placeholder` puts a
black pixel in place of a file that cannot be decoded, for the pipelines to skip (pipeline.py).
`Splits(data_cfg)` resolves the config's `source` string once; everything downstream receives
source objects. Nothing here imports TensorFlow at module level; `Tfds`
imports tensorflow_datasets when opened.
"""
import atexit
import functools
import io
import os
import pathlib
import shutil
import tarfile
import tempfile

import numpy as np
from absl import logging
from PIL import Image

from sce_jax import logs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_SPLITS = ("test", "val", "validation")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DataError(ValueError):
  """Data that cannot be read as configured; the message names the key to set."""


class UndecodableImage(ValueError):
  """An image file that cannot be decoded (corrupt, truncated, empty, not an image)."""

  def __init__(self, name, cause):
    super().__init__(f"cannot decode image {name}: {cause}")
    self.name = name


# What stands in for an undecodable image until the pipeline skips it: one black pixel.
PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


def is_archive(path) -> bool:
  """A .tar / .tar.gz / .tgz file, read through a temporary unpacked copy."""
  return str(path).endswith(_ARCHIVE_SUFFIXES)


@functools.cache
def _extract(archive: str) -> pathlib.Path:
  """Unpacks `archive` once per process into a temporary folder (never beside the archive)."""
  dest = pathlib.Path(tempfile.mkdtemp(prefix="sce_jax_"))
  atexit.register(shutil.rmtree, dest, ignore_errors=True)
  with tarfile.open(archive) as tar:
    tar.extractall(dest, filter="data")
  return dest


def _has_images(folder: pathlib.Path) -> bool:
  return any(f.name.lower().endswith(IMAGE_EXTENSIONS) for f in folder.iterdir() if f.is_file())


def _class_root(root: pathlib.Path, split: str) -> pathlib.Path:
  """`root/split` when it exists, else `root` itself if it holds class folders."""
  if (root / split).is_dir():
    return root / split
  subdirs = sorted(d for d in root.iterdir() if d.is_dir())
  if len(subdirs) == 1 and not _has_images(subdirs[0]):  # An archive's single split folder.
    return subdirs[0]
  if subdirs and not any(_has_images(d) for d in subdirs):
    raise DataError(f"no split {split!r} in {root}; found {[d.name for d in subdirs]}")
  return root


class ImageFolder:
  """A class-folder tree `root/<class>/<image>` (JPEG/PNG), classes sorted by name.

  `path` is such a tree, a folder with split subfolders (`path/<split>/<class>/...`), or a .tar
  / .tar.gz archive of either, unpacked once into a temporary folder.
  """

  def __init__(self, path, split: str = "train", classes=None):
    """classes: the class names that labels index (those of the training split, for another
    split); by default this split's class folders. An empty class folder is left out, with a
    warning: a class without an image would shift the labels of the next ones."""
    path = pathlib.Path(path)
    if not path.exists():
      raise DataError(
          f"dataset not found at {path}; set --config.data.path=... (a class-folder tree or a "
          ".tar/.tar.gz of one)")
    if path.is_file() and not is_archive(path):
      raise DataError(f"{path} is a file but not a .tar, .tar.gz or .tgz archive; set "
                      "--config.data.path (or data.eval_path) to a class-folder tree or an "
                      "archive of one.")
    self.root = _class_root(_extract(str(path.resolve())) if is_archive(path) else path, split)
    found = {}
    for name in sorted(d.name for d in self.root.iterdir() if d.is_dir()):
      for folder, _, files in sorted(os.walk(self.root / name)):
        found.setdefault(name, []).extend(
            os.path.join(folder, f) for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS))
    empty = [name for name, files in found.items() if not files]
    if empty:
      logging.warning("Left out %d class folder(s) of %s that hold no %s images: %s.", len(empty),
                      self.root, "/".join(IMAGE_EXTENSIONS), ", ".join(empty))
    self.classes = list(classes) if classes is not None else [n for n in found if found[n]]
    unknown = [name for name in found if found[name] and name not in self.classes]
    if unknown:
      raise DataError(f"{self.root} has class folders the training split lacks: "
                      f"{', '.join(unknown)}; both splits need the same class folders.")
    paths, labels = [], []
    for label, name in enumerate(self.classes):
      paths += found.get(name, [])
      labels += [label] * len(found.get(name, []))
    if not paths:
      raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in class folders under {path}")
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)

  def __len__(self):
    return len(self.paths)

  @property
  def num_examples(self):
    return len(self)

  @property
  def num_classes(self):
    return len(self.classes)

  def __getitem__(self, i):
    with open(self.paths[i], "rb") as f:
      return {"image": f.read(), "label": self.labels[i], "name": self.paths[i]}


class InMemory:
  """Decoded images held by the host: uint8 (N, H, W, 3) (or a list of (H, W, 3)) and labels."""

  def __init__(self, images, labels):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self):
    return len(self.labels)

  @property
  def num_examples(self):
    return len(self)

  @property
  def num_classes(self):
    return int(self.labels.max()) + 1

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def import_tfds():
  """tensorflow_datasets, or a DataError that says what to install or use instead."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        "source='tfds' needs tensorflow and tensorflow_datasets (pip install 'sce_jax[tf]'); "
        "without them use source='folder' or 'memory'") from e
  return tfds


class Tfds:
  """A TFDS split by name; random access through `tfds.data_source` (ArrayRecord datasets).

  Opening prepares a dataset that TFDS can download by itself (CIFAR, STL-10: the first run
  downloads it), so a run needs no separate `tfds build`; one that needs a manual download
  (ImageNet) or cannot be downloaded stops with a one-line error before anything compiles.
  """

  def __init__(self, name: str, split: str, data_dir=None):
    self.name, self.split, self.data_dir = name, split, data_dir or None  # "" = TFDS default.
    tfds = import_tfds()
    try:
      self.builder = tfds.builder(name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataError(f"data.name={name!r} is not a TFDS dataset ({e}).") from e
    if not self.builder.is_prepared():
      self._prepare()

  def _prepare(self):
    where = f"data_dir={self.builder.data_dir}"
    if getattr(self.builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
      raise DataError(
          f"TFDS dataset {self.name!r} is not prepared in {where} and needs a manual download: "
          f"put its files in DIR/downloads/manual/, run `python -c \"import tensorflow_datasets "
          f"as t; t.builder('{self.name}', data_dir='DIR').download_and_prepare()\"` and set "
          "--config.data.data_dir=DIR (README, ImageNet).")
    logging.info("Downloading and preparing TFDS dataset %r in %s (once).", self.name, where)
    try:
      self.builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except  # network, disk, TFDS errors alike
      raise DataError(
          f"TFDS could not download and prepare {self.name!r} in {where} "
          f"({logs.brief(e, 200)}); check the internet connection, or prepare it on a "
          "machine that has one and set --config.data.data_dir=DIR.") from e

  @property
  def num_examples(self):
    return self.builder.info.splits[self.split].num_examples

  @property
  def num_classes(self):
    return self.builder.info.features["label"].num_classes

  @functools.cached_property
  def _source(self):
    return import_tfds().data_source(self.name, split=self.split, data_dir=self.data_dir)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    example = self._source[i]
    return {"image": example["image"], "label": example["label"]}

  def __getstate__(self):  # Grain workers reopen the source rather than pickle it.
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

  def __setstate__(self, state):
    self.__init__(**state)


def decode(record, draft=None) -> Image.Image:
  """The record's image as an RGB PIL image; UndecodableImage names the file when it cannot be
  decoded.

  draft: optional `(width, height) -> (w, h) or None`, called with the encoded image's size
  before decoding; a JPEG is then decoded by libjpeg at 1/2, 1/4 or 1/8 scale, as small as it
  can be while still at least (w, h) (`PIL.Image.Image.draft`).
  """
  image = record["image"]
  if not isinstance(image, bytes):
    return Image.fromarray(np.asarray(image, np.uint8))
  try:
    im = Image.open(io.BytesIO(image))
    size = draft(*im.size) if draft is not None else None
    if size:
      im.draft("RGB", size)
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")  # No copy when already RGB.
  except (OSError, SyntaxError, ValueError) as e:
    raise UndecodableImage(record.get("name", "<bytes>"), e) from e


def decode_or_placeholder(record, draft=None) -> tuple[Image.Image, str]:
  """(image, '') as `decode`, or (PLACEHOLDER, the file's name) for an undecodable image. A
  decoded record that already stands in for one keeps its name in 'skipped'."""
  try:
    return decode(record, draft), record.get("skipped", "")
  except UndecodableImage as e:
    return Image.fromarray(PLACEHOLDER), e.name


def find_eval_path(path, split: str = "test"):
  """Where the evaluation split of training data `path` lives.

  A folder with a `split` (else test/val/validation) subfolder: that subfolder. An archive
  whose name contains 'train': its sibling with that name in place of 'train'.
  """
  path = pathlib.Path(path)
  names = (split,) + tuple(s for s in EVAL_SPLITS if s != split)
  if path.is_dir():
    candidates = [path / name for name in names]
  else:
    candidates = [path.with_name(path.name.replace("train", name))
                  for name in names if "train" in path.name]
  for candidate in candidates:
    if candidate.exists():
      return candidate
  raise DataError(f"no {split!r} split found for {path}; set --config.data.eval_path=...")


def _folder(data_cfg, split, train=None):
  """source='folder': `path` holds the training split; another split is at `eval_path`, or
  found next to `path` when that is empty, and labelled by the classes of `train`."""
  if not data_cfg.path:
    raise DataError("data.path is empty; set --config.data.path to a class-folder tree or "
                    "a .tar/.tar.gz of one (e.g. cifar10_jpg_train.tar.gz).")
  if not pathlib.Path(data_cfg.path).exists():
    raise DataError(f"data.path={data_cfg.path} does not exist; set --config.data.path to a "
                    "class-folder tree or a .tar/.tar.gz of one.")
  path = data_cfg.path if split == data_cfg.train_split else (
      data_cfg.eval_path or find_eval_path(data_cfg.path, split))
  return ImageFolder(path, split, classes=None if train is None else train.classes)


# data.source -> how a split is opened, (data_cfg, split, the opened training split or None).
# source='memory' reads `data_cfg.arrays[split] = (images, labels)`, set by code (a notebook, a
# test), not a flag.
SOURCES = {
    "folder": _folder,
    "tfds": lambda data_cfg, split, train=None: Tfds(data_cfg.name, split, data_cfg.data_dir),
    "memory": lambda data_cfg, split, train=None: InMemory(*data_cfg.arrays[split]),
}


class Splits:
  """The training and evaluation sources of a data config, each opened once.

  The training split is opened at once (a missing path stops the run before it compiles); the
  evaluation split when first used, so a run without evaluation needs none.
  """

  def __init__(self, data_cfg):
    self._cfg = data_cfg
    self.train = SOURCES[data_cfg.source](data_cfg, data_cfg.train_split)

  @functools.cached_property
  def eval(self):
    return SOURCES[self._cfg.source](self._cfg, self._cfg.eval_split, self.train)

  @property
  def num_classes(self):
    return self.train.num_classes

"""The data a run reads: one source per split, opened once from the data config.

A source has `__len__` and `__getitem__(i) -> {'image', 'label'}` (grain's RandomAccessDataSource
protocol), and knows its `num_examples` and `num_classes`. 'image' is encoded bytes
(`ImageFolder`, whose records also hold the file's 'name'), or a decoded uint8 (H, W, 3) array
(`InMemory`, `Tfds`); `decode` turns either into a PIL image, and `decode_or_placeholder` puts a
black pixel in place of a file that cannot be decoded, for the pipelines to skip (pipeline.py).
`Splits(data_cfg)` resolves the config's `source` string once; everything downstream receives
source objects. Nothing here imports TensorFlow at module level; `Tfds`
imports tensorflow_datasets when opened.

An archive (.tar/.tar.gz) of images of one size (CIFAR, STL-10, Tiny ImageNet) is decoded once
into a uint8 array cache in data.cache_dir (`read_archive`) and opened from it as `InMemory`;
an archive of images of several sizes (ImageNet) is unpacked into a temporary folder.
"""
import atexit
import concurrent.futures
import functools
import hashlib
import io
import json
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
_CACHE_FORMAT = 2  # Bump when the cache's layout or decoding changes: old entries are not read.


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
  """A .tar / .tar.gz / .tgz file: cached as arrays (`read_archive`) or unpacked (`_extract`)."""
  return str(path).endswith(_ARCHIVE_SUFFIXES)


@functools.cache
def _extract(archive: str) -> pathlib.Path:
  """Unpacks `archive` once per process into a temporary folder (never beside the archive)."""
  dest = pathlib.Path(tempfile.mkdtemp(prefix="sce_jax_"))
  atexit.register(shutil.rmtree, dest, ignore_errors=True)
  with tarfile.open(archive) as tar:
    tar.extractall(dest, filter="data")
  return dest


def _listdir(folder: pathlib.Path):
  """(subfolder names, file names) of a folder."""
  entries = list(folder.iterdir())
  return [e.name for e in entries if e.is_dir()], [e.name for e in entries if e.is_file()]


def _has_images(files) -> bool:
  return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files)


def _class_root(root, split: str, listdir=_listdir):
  """`root/split` when it exists, else `root` itself if it holds class folders.

  listdir(folder) -> (subfolder names, file names): a folder on disk by default, or an archive's
  listing (`read_archive`).
  """
  dirs, _ = listdir(root)
  if split in dirs:
    return root / split
  subdirs = sorted(dirs)
  if len(subdirs) == 1 and not _has_images(listdir(root / subdirs[0])[1]):
    return root / subdirs[0]  # An archive's single split folder.
  if subdirs and not any(_has_images(listdir(root / d)[1]) for d in subdirs):
    raise DataError(f"no split {split!r} in {root}; found {subdirs}")
  return root


def _labelled(found, where, classes=None):
  """(classes, files, labels) of class folders `found` ({name: its image files, in order}).

  classes: the names that labels index (the training split's, for another split); by default
  the folders that hold images. An empty class folder is left out, with a warning: a class
  without an image would shift the labels of the next ones.
  """
  empty = [name for name, files in found.items() if not files]
  if empty:
    logging.warning("Left out %d class folder(s) of %s that hold no %s images: %s.", len(empty),
                    where, "/".join(IMAGE_EXTENSIONS), ", ".join(empty))
  classes = list(classes) if classes is not None else [n for n in found if found[n]]
  unknown = [name for name in found if found[name] and name not in classes]
  if unknown:
    raise DataError(f"{where} has class folders the training split lacks: "
                    f"{', '.join(unknown)}; both splits need the same class folders.")
  files, labels = [], []
  for label, name in enumerate(classes):
    files += found.get(name, [])
    labels += [label] * len(found.get(name, []))
  if not files:
    raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in class folders under {where}")
  return classes, files, np.asarray(labels, np.int32)


class ImageFolder:
  """A class-folder tree `root/<class>/<image>` (JPEG/PNG), classes sorted by name.

  `path` is such a tree, a folder with split subfolders (`path/<split>/<class>/...`), or a .tar
  / .tar.gz archive of either, unpacked once into a temporary folder.
  """

  def __init__(self, path, split: str = "train", classes=None):
    """classes: the class names that labels index, as `_labelled`."""
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
    self.classes, self.paths, self.labels = _labelled(found, self.root, classes)

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
  """Decoded images held by the host: uint8 (N, H, W, 3) (or a list of (H, W, 3)) and labels;
  `classes` names them when known (an archive's class folders)."""

  def __init__(self, images, labels, classes=None):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = np.asarray(labels, np.int32)
    self.classes = classes

  def __len__(self):
    return len(self.labels)

  @property
  def num_examples(self):
    return len(self)

  @property
  def num_classes(self):
    return len(self.classes) if self.classes else int(self.labels.max()) + 1

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def _scan_archive(archive):
  """(listing, {path: bytes}) of every image in a class-folder archive, read in one pass;
  listing maps a folder to its (subfolder names, file names). None as soon as two images
  differ in size or one has no readable header (ImageNet, a damaged file): such an archive is
  not cached but unpacked, and not read beyond that point."""
  listing, images, size = {}, {}, None
  entry = lambda folder: listing.setdefault(folder, (set(), []))
  with tarfile.open(archive) as tar:
    for member in tar:
      path = pathlib.PurePosixPath(member.name)
      if (not path.parts or path.is_absolute() or ".." in path.parts
          or not (member.isfile() or member.isdir())):
        continue
      folders = list(path.parents)[:-1] + ([path] if member.isdir() else [])
      for folder in folders:
        entry(folder.parent)[0].add(folder.name)
      if member.isdir() or not path.name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      entry(path.parent)[1].append(path.name)
      data = tar.extractfile(member).read()
      try:
        image_size = Image.open(io.BytesIO(data)).size
      except (OSError, SyntaxError, ValueError):
        return None
      if size not in (None, image_size):
        return None
      size, images[path] = image_size, data
  return listing, images


def _decode_archive(archive, split, dest, classes):
  """Decodes one split of `archive` into dest/{images.npy, labels.npy, classes.json}, in
  ImageFolder's order and with its labels (`_labelled`). False if the archive is not one of
  images of one size that all decode."""
  scanned = _scan_archive(archive)
  if scanned is None:
    return False
  listing, files = scanned
  root = _class_root(pathlib.PurePosixPath("."), split,
                     lambda folder: listing.get(folder, ((), [])))
  found = {name: [] for name in sorted(listing.get(root, ((), []))[0])}
  for p in sorted(files, key=lambda p: (str(p.parent), p.name)):  # One pass, in folder order.
    parts = p.relative_to(root).parts if p.is_relative_to(root) else ()
    if len(parts) > 1:
      found[parts[0]].append(p)
  classes, chosen, labels = _labelled(found, f"{archive}:{root}", classes)
  width, height = Image.open(io.BytesIO(files[chosen[0]])).size
  images = np.lib.format.open_memmap(dest / "images.npy", mode="w+", dtype=np.uint8,
                                     shape=(len(chosen), height, width, 3))
  try:
    decode_into(images, [{"image": files[p], "name": f"{archive}:{p}"} for p in chosen])
  except UndecodableImage:  # Read unpacked, where the pipelines' skipping policy applies.
    return False
  images.flush()
  np.save(dest / "labels.npy", labels)
  (dest / "classes.json").write_text(json.dumps(classes))
  return True


def read_archive(archive, split, cache_dir, classes=None):
  """One split of a class-folder archive as an `InMemory` source, from the array cache in
  `cache_dir`, which the first call builds; None when it cannot be cached (`_decode_archive`).

  classes: as `_labelled`. An entry is keyed by the archive's path, size and mtime, the split
  and the classes, so a changed archive is decoded again. It is built in a temporary folder
  beside it and renamed into place: a process never reads a partial entry, and of two processes
  building it at once the second rename fails and that process reads the first's (a killed
  build leaves only a hidden `.NAME.*` folder). Images are memory-mapped, so a second start
  reads them in seconds.
  """
  archive = pathlib.Path(archive).resolve()
  stat = archive.stat()
  key = (f"{archive}\0{stat.st_size}\0{stat.st_mtime_ns}\0{split}\0{classes}\0"
         f"{_CACHE_FORMAT}")
  cache_dir = pathlib.Path(cache_dir).expanduser()
  entry = cache_dir / f"{archive.name}.{split}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"
  if not entry.is_dir():
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{entry.name}."))
    try:
      if not _decode_archive(archive, split, tmp, classes):
        logging.info("%s holds images of several sizes or a damaged one: unpacking it, not "
                     "caching arrays.", archive)
        return None
      try:
        os.replace(tmp, entry)
      except OSError:
        if not entry.is_dir():  # Else another process renamed a whole entry first.
          raise
      logging.info("Decoded the %r split of %s into the cache %s.", split, archive, entry)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return InMemory(np.load(entry / "images.npy", mmap_mode="r"), np.load(entry / "labels.npy"),
                  json.loads((entry / "classes.json").read_text()))


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


def decode_into(images, records, labels=None):
  """images[i] = the decoded image of records[i] (and labels[i] its label, if given), for every
  i < len(images), on every core (Pillow decodes without the GIL). A DataError names the first
  image whose size is not images' (H, W)."""
  def put(i):
    record = records[i]
    image = np.asarray(decode(record))
    if image.shape != images.shape[1:]:
      raise DataError(f"image {record.get('name', i)} is {image.shape[1]}x{image.shape[0]}, not "
                      f"{images.shape[2]}x{images.shape[1]} like the others")
    images[i] = image
    if labels is not None:
      labels[i] = record["label"]

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(put, range(len(images))))


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
  found next to `path` when that is empty, and labelled by the classes of `train`. Archives of
  images of one size come from the array cache in data.cache_dir (`read_archive`)."""
  if not data_cfg.path:
    raise DataError("data.path is empty; set --config.data.path to a class-folder tree or "
                    "a .tar/.tar.gz of one (e.g. cifar10_jpg_train.tar.gz).")
  if not pathlib.Path(data_cfg.path).exists():
    raise DataError(f"data.path={data_cfg.path} does not exist; set --config.data.path to a "
                    "class-folder tree or a .tar/.tar.gz of one.")
  path = data_cfg.path if split == data_cfg.train_split else (
      data_cfg.eval_path or find_eval_path(data_cfg.path, split))
  classes = None if train is None else train.classes
  if is_archive(path) and pathlib.Path(path).is_file():
    cached = read_archive(path, split, data_cfg.cache_dir, classes)
    if cached is not None:
      return cached
  return ImageFolder(path, split, classes=classes)


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

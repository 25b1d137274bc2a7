"""The data a run reads: one source per split, opened once from the data config.

A source has `__len__` and `__getitem__(i) -> {'image', 'label'}` (grain's RandomAccessDataSource
protocol), and knows its `num_examples` and `num_classes`. 'image' is encoded bytes
(`ImageFolder`, whose records also hold the file's 'name'), or a decoded uint8 (H, W, 3) array
(`InMemory`, `Tfds`); images.py decodes either. `Splits(data_cfg)` resolves the config's
`source` string once (or its `mixture` of several sources, `Mixture`); everything downstream
receives source objects. Nothing here imports TensorFlow at module level; `Tfds` imports
tensorflow_datasets when opened.

An archive (.tar/.tar.gz) of images of one size (CIFAR, STL-10, Tiny ImageNet) is read from the
array cache in data.cache_dir (archive_cache.py) as `InMemory`; an archive of images of several
sizes (ImageNet) is unpacked into a temporary folder (folders.py).
"""
import copy
import functools
import math
import os
import pathlib
import socket
import urllib.parse
import urllib.request

import grain
import numpy as np
from absl import logging

from sce_jax import logs
from sce_jax.data import archive_cache, folders
from sce_jax.data.images import IMAGE_EXTENSIONS, DataError


class ImageFolder:
  """Image files on disk (JPEG/PNG): a class-folder tree `root/<class>/<image>`, classes sorted
  by name; or, with labels='none', every image under a folder (at any depth) or each path of a
  file list, with no classes (label 0, `num_classes` 0).

  `path` is such a folder, a folder with split subfolders (`path/<split>/...`), a .tar / .tar.gz
  archive of either, unpacked once into a temporary folder, or (labels='none') a text file
  listing image paths (`folders.read_list`).
  """

  def __init__(self, path, split: str = "train", classes=None, labels="folders",
               cache_dir=None):
    """classes: the class names that labels index, as `folders.labelled`; labels: 'folders' or
    'none' (data.labels, resolved); cache_dir: where the file list is cached
    (`folders.image_files`)."""
    path = pathlib.Path(path)
    if not path.exists():
      raise DataError(
          f"dataset not found at {path}; set --config.data.path=... (a folder of images, a "
          ".tar/.tar.gz of one, or a text file listing images)")
    if path.is_file() and not folders.is_archive(path):
      if labels != "none":
        raise DataError(f"{path} is a file but not a .tar, .tar.gz or .tgz archive: a list of "
                        "images has no class folders; set --config.data.labels=none, or "
                        "--config.data.path (or data.eval_path) to a class-folder tree.")
      self.root, self.paths = path.parent, folders.read_list(path)
    else:
      if folders.is_archive(path):
        path = folders.extract(str(path.resolve()))
        cache_dir = None  # a new temporary folder at each start: nothing to cache
      if labels == "none":
        self.root = folders.split_root(path, split)
        self.paths = [os.path.join(self.root, f)
                      for f in folders.image_files(self.root, cache_dir)]
        if not self.paths:
          raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")
    if labels == "none":
      self.classes, self.labels = [], np.zeros(len(self.paths), np.int32)
      return
    self.root = folders.class_root(path, split)
    found = {name: [] for name in sorted(d.name for d in self.root.iterdir() if d.is_dir())}
    for f in folders.image_files(self.root, cache_dir):
      name, sep, _ = f.partition(os.sep)
      if sep:  # images in a class folder, at any depth below it
        found[name].append(os.path.join(self.root, f))
    self.classes, self.paths, self.labels = folders.labelled(found, self.root, classes)

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
    self._check_online()
    logging.info("Downloading and preparing TFDS dataset %r in %s (once).", self.name, where)
    try:
      self.builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except  # network, disk, TFDS errors alike
      raise DataError(
          f"TFDS could not download and prepare {self.name!r} in {where} "
          f"({logs.brief(e, 200)}); check the internet connection, or prepare it on a "
          "machine that has one and set --config.data.data_dir=DIR.") from e

  def _check_online(self, timeout=5.0):
    """A DataError within seconds if a host TFDS downloads this dataset from cannot be reached
    (no DNS, no route): offline, TFDS retries for minutes before it gives up. Behind a proxy
    (HTTP(S)_PROXY), which TFDS's downloads go through, nothing is probed."""
    if urllib.request.getproxies():
      return
    urls = map(urllib.parse.urlsplit, self.builder.url_infos or {})
    for host, port in sorted({(u.hostname, u.port or (443 if u.scheme == "https" else 80))
                              for u in urls}):
      try:
        socket.create_connection((host, port), timeout=timeout).close()
      except OSError as e:
        raise DataError(
            f"TFDS cannot download {self.name!r}: {host}:{port} cannot be reached "
            f"from this machine ({logs.brief(e, 200)}). Offline, use a local copy: for CIFAR "
            "the official cifar-10-python.tar.gz or cifar-100-python.tar.gz (README, Without "
            "internet) with --config.data.source=folder --config.data.path=FILE, or a TFDS "
            "data_dir prepared on a machine that has internet (--config.data.data_dir=DIR).")

  @property
  def num_examples(self):
    return self.builder.info.splits[self.split].num_examples

  @property
  def num_classes(self):
    return self.builder.info.features["label"].num_classes

  @property
  def classes(self):
    return self.builder.info.features["label"].names

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


def tfds_examples(name, split, data_dir=None):
  """(builder, the examples of a TFDS split as dicts of NumPy values, in the split's order,
  images still encoded): for the protocols that read other features than image and label
  (VOC's objects, Caltech-101's file names). The encoded images stay in host memory."""
  tfds = import_tfds()
  builder = Tfds(name, split, data_dir).builder
  return builder, list(tfds.as_numpy(builder.as_dataset(
      split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})))


def multi_label_tfds(name, split, data_dir=None, key="labels_no_difficult"):
  """A multi-label TFDS split (VOC2007) as (an `InMemory` of its encoded images, each labelled
  by its row, (N, C) bool targets): an image's classes are those of its `key` feature, for
  VOC the objects not marked difficult, as the label files of ssl-transfer and PCL count them
  (docs/SCE.md 9). The encoded images stay in host memory (VOC2007: ~0.5 GB a split)."""
  builder, examples = tfds_examples(name, split, data_dir)
  num_classes = builder.info.features[key].feature.num_classes
  targets = np.stack([np.isin(np.arange(num_classes), e[key]) for e in examples])
  return InMemory([e["image"] for e in examples], np.arange(len(examples))), targets


def subset(source, indices):
  """Examples `indices` of a class-folder or in-memory source, as a source of the same kind
  with the same classes (fine-tuning's label fraction). A TFDS split has named subsets instead
  (imagenet2012_subset)."""
  if isinstance(source, InMemory):
    images = source.images
    images = images[indices] if isinstance(images, np.ndarray) else [images[i] for i in indices]
    return InMemory(images, source.labels[indices], source.classes)
  if isinstance(source, ImageFolder):
    out = copy.copy(source)
    out.paths, out.labels = [source.paths[i] for i in indices], source.labels[indices]
    return out
  raise TypeError(f"a subset of a {type(source).__name__} source; TFDS names its subsets")


def _labels(data_cfg, path) -> str:
  """data.labels resolved for training data `path`: as set, or (auto) `folders.choose_labels`
  of its images, said in one line. A file list has none."""
  if data_cfg.labels != "auto":
    return data_cfg.labels
  path = pathlib.Path(path)
  if path.is_file() and not folders.is_archive(path):
    chosen = "none"
  elif folders.is_archive(path):
    chosen = ("folders" if archive_cache.is_cifar(path) else
              folders.choose_labels(folders.archive_images(path), data_cfg.train_split))
  else:
    chosen = folders.choose_labels(folders.image_files(path, data_cfg.cache_dir),
                                   data_cfg.train_split)
  logging.info("data.labels=auto: %s", f"{path} has class folders; labelled by them." if
               chosen == "folders" else f"{path} has no class folders; unlabelled (evaluations "
               "that need labels read eval.data).")
  return chosen


def _folder(data_cfg, split, train=None):
  """source='folder': `path` holds the training split; another split is at `eval_path`, or
  found next to `path` when that is empty (in `path` itself for a CIFAR Python archive), and
  labelled by the classes of `train`. Archives of class folders of images of one size and
  CIFAR's come from the array cache in data.cache_dir (archive_cache.py). Without labels
  (data.labels), only the training split is read."""
  if not data_cfg.path:
    raise DataError("data.path is empty; set --config.data.path to a folder of images, a "
                    ".tar/.tar.gz of one, a text file listing images, or CIFAR's "
                    "cifar-10-python.tar.gz (README).")
  if not pathlib.Path(data_cfg.path).exists():
    raise DataError(f"data.path={data_cfg.path} does not exist; set --config.data.path to a "
                    "folder of images, a .tar/.tar.gz of one, a text file listing images, or "
                    "CIFAR's cifar-10-python.tar.gz (README).")
  archive = lambda p: folders.is_archive(p) and pathlib.Path(p).is_file()
  path = data_cfg.path
  labels = _labels(data_cfg, path) if train is None else (
      "folders" if train.num_classes else "none")
  if labels == "none":
    if train is not None:
      raise DataError(f"data.path={path} has no labels, so it has no evaluation split; set "
                      "--config.eval.data.path (or eval.data.name) to a labelled set.")
    return ImageFolder(path, split, labels="none", cache_dir=data_cfg.cache_dir)
  if split != data_cfg.train_split:
    both = archive(path) and archive_cache.is_cifar(path)
    path = data_cfg.eval_path or (path if both else folders.find_eval_path(path, split))
  classes = None if train is None else train.classes
  if archive(path):
    cached = archive_cache.read(path, split, data_cfg.cache_dir, classes)
    if cached is not None:
      return InMemory(*cached)
  return ImageFolder(path, split, classes=classes, cache_dir=data_cfg.cache_dir)


# data.source -> how a split is opened, (data_cfg, split, the opened training split or None).
# source='memory' reads `data_cfg.arrays[split] = (images, labels)`, set by code (a notebook, a
# test), not a flag.
SOURCES = {
    "folder": _folder,
    "tfds": lambda data_cfg, split, train=None: Tfds(data_cfg.name, split, data_cfg.data_dir),
    "memory": lambda data_cfg, split, train=None: InMemory(*data_cfg.arrays[split]),
}


# data.mixture's kinds of source -> the data key its WHAT sets: a part is opened as data.source
# KIND would open it, with the other data keys as set (data.labels, data.data_dir,
# data.train_split, ...).
MIXTURE_KINDS = {"folder": "path", "tfds": "name"}
_MIXTURE_EXAMPLE = "e.g. 'tfds:imagenet2012=0.7,folder:/data/mine=0.3'"


def parse_mixture(text) -> list[tuple[str, str, float]]:
  """data.mixture, 'KIND:WHAT=WEIGHT,...', as [(kind, what, weight)]; a ValueError names the
  first item that is not one, a weight that is not positive, or a mixture of one source."""
  parts = []
  for item in text.split(","):
    spec, _, weight = item.strip().rpartition("=")
    kind, _, what = spec.partition(":")
    if kind not in MIXTURE_KINDS or not what:
      raise ValueError(f"data.mixture item {item!r} is not KIND:WHAT=WEIGHT with KIND one of "
                       f"{', '.join(MIXTURE_KINDS)} ({_MIXTURE_EXAMPLE})")
    try:
      weight = float(weight)
    except ValueError:
      weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
      raise ValueError(f"data.mixture item {item!r} has no positive weight after its '=' "
                       f"({_MIXTURE_EXAMPLE})")
    parts.append((kind, what, weight))
  if len(parts) < 2:
    raise ValueError(f"data.mixture={text!r} names one source; name two or more "
                     f"({_MIXTURE_EXAMPLE}), or set data.source and data.path (or data.name)")
  return parts


def _image_size(source):
  """(height, width) of every image of `source` where it is fixed and known (arrays of one
  shape, a TFDS image feature of one shape), else None (a folder: any sizes)."""
  if isinstance(source, InMemory) and isinstance(source.images, np.ndarray):
    return tuple(source.images.shape[1:3])
  if isinstance(source, Tfds):
    shape = tuple(source.builder.info.features["image"].shape[:2])
    return None if None in shape else shape
  return None


class Mixture:
  """Training sources drawn in proportion to their weights (data.mixture), by grain's mixing
  law (`grain.MapDataset.mix`): a fixed interleaving in which every prefix of the stream holds
  each source's share to within one image, so batches hold the proportions too. Each source
  keeps its own stream (shuffled every epoch); position p of the mixture is the next image of
  the source the law names for p, so the mixture's position in a checkpoint is the step, as a
  single source's. Both loaders follow the one law (`cycle`, `drawn`).

  Labelled when every source is labelled with the same class names in the same order (an
  ImageNet class-folder tree and TFDS imagenet2012 both name classes by WordNet id); otherwise
  unlabelled (`num_classes` 0; pipeline.py sets the labels to 0). Its evaluations read
  eval.data either way (`labelled`). Sources whose images have a fixed size must agree on it:
  one pipeline (data.views, data.image_size) crops them all.
  """

  def __init__(self, parts, weights, names):
    self.parts, self.names = list(parts), list(names)
    # grain scales the weights so that the smallest is 100 and truncates the others
    # (grain.MapDataset.mix); scaled so here, they are its proportions as they are: each weight
    # is kept to 1 % of the smallest.
    self.proportions = [round(100 * w / min(weights)) for w in weights]
    classes = [list(getattr(p, "classes", None) or []) for p in self.parts]
    self.classes = classes[0] if all(c and c == classes[0] for c in classes) else []
    sizes = {n: _image_size(p) for n, p in zip(self.names, self.parts) if _image_size(p)}
    if len(set(sizes.values())) > 1:
      raise DataError(
          "data.mixture: its sources' images differ in size ("
          + ", ".join(f"{n} {h}x{w}" for n, (h, w) in sizes.items()) + "), and one pipeline "
          "(data.views, data.image_size) crops them all; mix sources of one image size.")

  def __len__(self):
    return sum(map(len, self.parts))

  @property
  def num_examples(self):
    return len(self)

  @property
  def num_classes(self):
    return len(self.classes)

  @functools.cached_property
  def cycle(self) -> np.ndarray:
    """The source of each position of one period of the law, read from grain's mix; the law
    repeats itself every sum(proportions) / gcd(proportions) positions."""
    ids = grain.MapDataset.mix([grain.MapDataset.source([k]).repeat()
                                for k in range(len(self.parts))], self.proportions)
    return np.array([ids[p] for p in range(sum(self.proportions) //
                                           math.gcd(*self.proportions))], np.int64)

  def drawn(self, position) -> np.ndarray:
    """How many images of each source the positions before `position` hold."""
    period, rest = divmod(position, len(self.cycle))
    count = lambda cycle: np.bincount(cycle, minlength=len(self.parts))
    return period * count(self.cycle) + count(self.cycle[:rest])


def _mixture(data_cfg):
  """data.mixture's sources, each opened as data.source KIND opens it, as a `Mixture`."""
  parts, weights, names = [], [], []
  for kind, what, weight in parse_mixture(data_cfg.mixture):
    cfg = data_cfg.copy_and_resolve_references()
    cfg.update({"source": kind, MIXTURE_KINDS[kind]: what, "mixture": ""})
    parts.append(SOURCES[kind](cfg, cfg.train_split))
    weights.append(weight)
    names.append(f"{kind}:{what}")
  mixture = Mixture(parts, weights, names)
  logging.info("data.mixture: %s; %s.", ", ".join(
      f"{n} ({len(p)} images, weight {w:g})" for n, p, w in zip(names, parts, weights)),
      f"labelled by their {mixture.num_classes} common classes" if mixture.num_classes else
      "unlabelled (its sources have no labels or not the same classes)")
  return mixture


class Splits:
  """The training and evaluation sources of a data config, each opened once.

  The training split is opened at once (a missing path stops the run before it compiles); the
  evaluation split by `open_eval`, which a run that evaluates calls before it compiles (the
  split is labelled by the training split's classes, and a class it has images of but the
  training split has none of stops it there), or else when first used, so a run without
  evaluation needs none.
  """

  def __init__(self, data_cfg):
    self._cfg = data_cfg
    self.train = (_mixture(data_cfg) if data_cfg.get("mixture") else
                  SOURCES[data_cfg.source](data_cfg, data_cfg.train_split))

  @functools.cached_property
  def eval(self):
    if isinstance(self.train, Mixture):
      raise DataError("data.mixture has no evaluation split of its own; set "
                      "--config.eval.data.path (or eval.data.name) to a labelled set.")
    return SOURCES[self._cfg.source](self._cfg, self._cfg.eval_split, self.train)

  def open_eval(self):
    """Opens the evaluation split now."""
    return self.eval

  @property
  def num_classes(self):
    return self.train.num_classes


def labelled(splits, data_cfg, eval_data_cfg):
  """The splits that the evaluations needing labels (kNN, the probes, fine-tuning) read:
  `splits` when its training data have labels and are not a mixture, else the labelled set
  given apart in config.eval.data (`eval_data_cfg`: a class-folder path with its evaluation
  split beside it, or a TFDS name), opened with data config `data_cfg`'s other values; None
  without one. A labelled mixture's set must have its classes (the online probe's)."""
  mixture = isinstance(splits.train, Mixture)
  if splits.num_classes and not mixture:
    return splits
  changes = (dict(source="folder", path=eval_data_cfg.path, eval_path="", labels="folders")
             if eval_data_cfg.path else
             dict(source="tfds", name=eval_data_cfg.name) if eval_data_cfg.name else None)
  if changes is None:
    return None
  cfg = data_cfg.copy_and_resolve_references()
  cfg.update(changes, mixture="")
  out = Splits(cfg)
  if mixture and splits.num_classes and list(out.train.classes) != splits.train.classes:
    raise DataError(
        f"eval.data ({eval_data_cfg.path or eval_data_cfg.name}) has other classes than "
        "data.mixture, whose labels train the online probe; give a labelled set of the same "
        "classes, or --config.probe.enabled=False.")
  return out

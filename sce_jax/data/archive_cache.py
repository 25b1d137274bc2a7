"""The array cache of archives of images of one size (CIFAR, STL-10, Tiny ImageNet).

Such an archive is decoded once into uint8 arrays in data.cache_dir (`read`), memory-mapped at
later starts; an archive of images of several sizes (ImageNet), or one holding a damaged image,
is not cached (the caller unpacks it). Besides class folders of images, the official CIFAR-10
and CIFAR-100 Python archives (cifar-10-python.tar.gz, cifar-100-python.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html: pickled batches of both splits) are read directly
(`is_cifar`).
"""
import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import tempfile
from typing import NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from sce_jax.data import folders
from sce_jax.data.images import IMAGE_EXTENSIONS, DataError, UndecodableImage, decode_into

_CACHE_FORMAT = 2  # Bump when the cache's layout or decoding changes: old entries are not read.


class _Cifar(NamedTuple):
  """The layout of an official CIFAR Python archive, under its top folder."""
  batches: dict    # split -> its batch files
  labels: bytes    # the key of a batch's labels
  meta: str        # the file of the class names
  names: bytes     # their key there


_CIFAR = {  # by top folder
    "cifar-10-batches-py": _Cifar({"train": [f"data_batch_{i}" for i in range(1, 6)],
                                   "test": ["test_batch"]}, b"labels", "batches.meta",
                                  b"label_names"),
    "cifar-100-python": _Cifar({"train": ["train"], "test": ["test"]}, b"fine_labels", "meta",
                               b"fine_label_names"),
}


class _Batch(pickle.Unpickler):
  """Unpickles plain values and NumPy arrays, nothing else: a pickle can call whatever it names,
  and an archive is data from elsewhere. (_codecs.encode: how Python 3 writes bytes at pickle
  protocol 2, the originals' protocol.)"""
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"{module}.{name} has no place in a CIFAR batch")
    return super().find_class(module, name)


def is_cifar(archive) -> bool:
  """Whether `archive` is an official CIFAR Python archive (its first entry is the top folder);
  such an archive holds both splits."""
  with folders.open_archive(archive) as tar:
    first = tar.next()
  return first is not None and pathlib.PurePosixPath(first.name).parts[0] in _CIFAR


def _decode_cifar(archive, split, dest, classes):
  """Decodes one split of an official CIFAR Python archive into dest/{images.npy, labels.npy,
  classes.json}. A batch's 'data' is uint8 (N, 3072): per image the 32x32 red plane, then green,
  then blue, each row by row."""
  def load(tar, top, name):
    try:
      return _Batch(tar.extractfile(f"{top}/{name}"), encoding="bytes").load()
    except (KeyError, pickle.UnpicklingError) as e:  # KeyError: not in the archive.
      raise DataError(f"{archive} is not a whole CIFAR Python archive: cannot read {top}/{name} "
                      f"({type(e).__name__}: {e}); download it again.") from e

  with folders.open_archive(archive) as tar:
    top = pathlib.PurePosixPath(tar.next().name).parts[0]
    layout = _CIFAR[top]
    if split not in layout.batches:
      raise DataError(f"{archive} holds the splits {', '.join(map(repr, layout.batches))}, not "
                      f"{split!r}; set --config.data.train_split / eval_split to them.")
    names = [n.decode() if isinstance(n, bytes) else n
             for n in load(tar, top, layout.meta)[layout.names]]
    batches = [load(tar, top, name) for name in layout.batches[split]]
    folders.read_to_end(tar)
  if classes is not None and list(classes) != names:
    raise DataError(f"{archive}'s classes are not those of the training split; set "
                    "--config.data.eval_path to the archive the training split came from.")
  images = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
  np.save(dest / "images.npy", images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  np.save(dest / "labels.npy", np.concatenate([b[layout.labels] for b in batches]).astype(
      np.int32))
  (dest / "classes.json").write_text(json.dumps(names))
  return True


def _scan_archive(archive):
  """(listing, {path: bytes}) of every image in a class-folder archive, read in one pass;
  listing maps a folder to its (subfolder names, file names). None as soon as two images
  differ in size or one has no readable header (ImageNet, a damaged file): such an archive is
  not cached but unpacked, and not read beyond that point. Else read to its end
  (`folders.read_to_end`), a damaged archive a DataError."""
  listing, images, size = {}, {}, None
  entry = lambda folder: listing.setdefault(folder, (set(), []))
  with folders.open_archive(archive) as tar:
    for member in tar:
      path = pathlib.PurePosixPath(member.name)
      if (not path.parts or path.is_absolute() or ".." in path.parts
          or not (member.isfile() or member.isdir())):
        continue
      for folder in list(path.parents)[:-1] + ([path] if member.isdir() else []):
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
    folders.read_to_end(tar)
  return listing, images


def _decode_archive(archive, split, dest, classes):
  """Decodes one split of `archive` into dest/{images.npy, labels.npy, classes.json}, in
  ImageFolder's order and with its labels (`folders.labelled`). False if the archive is not one of
  images of one size that all decode."""
  scanned = _scan_archive(archive)
  if scanned is None:
    return False
  listing, files = scanned
  root = folders.class_root(pathlib.PurePosixPath("."), split,
                     lambda folder: listing.get(folder, ((), [])))
  found = {name: [] for name in sorted(listing.get(root, ((), []))[0])}
  for p in sorted(files, key=lambda p: (str(p.parent), p.name)):  # One pass, in folder order.
    parts = p.relative_to(root).parts if p.is_relative_to(root) else ()
    if len(parts) > 1:
      found[parts[0]].append(p)
  classes, chosen, labels = folders.labelled(found, f"{archive}:{root}", classes)
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


def read(archive, split, cache_dir, classes=None):
  """One split of a class-folder archive or a CIFAR Python archive as (images (N, H, W, 3) uint8
  memory-mapped, labels, class names), from the array cache in `cache_dir`, which the first call
  builds; None when it cannot be cached (`_decode_archive`).

  classes: as `folders.labelled`. An entry is keyed by the archive's path, size and mtime, the split
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
      decode = _decode_cifar if is_cifar(archive) else _decode_archive
      if not decode(archive, split, tmp, classes):
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
  return (np.load(entry / "images.npy", mmap_mode="r"), np.load(entry / "labels.npy"),
          json.loads((entry / "classes.json").read_text()))

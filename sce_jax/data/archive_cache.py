"""The array cache of archives of images of one size (CIFAR, STL-10, Tiny ImageNet).

Such an archive is decoded once into uint8 arrays in data.cache_dir (`read`), memory-mapped at
later starts; an archive of images of several sizes (ImageNet), or one holding a damaged image,
is not cached (the caller unpacks it).
"""
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

from sce_jax.data import folders
from sce_jax.data.images import IMAGE_EXTENSIONS, UndecodableImage, decode_into

_CACHE_FORMAT = 2  # Bump when the cache's layout or decoding changes: old entries are not read.


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
  """One split of a class-folder archive as (images (N, H, W, 3) uint8 memory-mapped, labels,
  class names), from the array cache in `cache_dir`, which the first call builds; None when it
  cannot be cached (`_decode_archive`).

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
  return (np.load(entry / "images.npy", mmap_mode="r"), np.load(entry / "labels.npy"),
          json.loads((entry / "classes.json").read_text()))

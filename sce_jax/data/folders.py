"""The layout of a data set on disk or in an archive: where its splits and classes are, and how
its files are labelled (docs/SCE.md 6).

`root/<class>/<image>`, or `root/<split>/<class>/<image>`, or a .tar/.tar.gz of either. Classes
are the folders that hold images, sorted by name; another split is labelled by the training
split's classes. Images without that structure (a flat folder, nested folders that are not
classes, a file list) have no labels: data.labels (`LABELS`, `choose_labels`) says which.
"""
import atexit
import contextlib
import functools
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import tarfile
import tempfile
import time
import zlib

import numpy as np
from absl import logging

from sce_jax import logs
from sce_jax.data.images import IMAGE_EXTENSIONS, DataError

EVAL_SPLITS = ("test", "val", "validation")
# data.labels: "folders" (class folders), "none" (every image, no labels), "auto" (`choose_labels`).
LABELS = ("auto", "folders", "none")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_LISTING_FORMAT = 1  # of the cached file lists (`image_files`); bump when it changes
_RACY_NS = 2_000_000_000  # mtimes this close to a listing are not trusted (FAT: 2 s ticks)


def is_archive(path) -> bool:
  """A .tar / .tar.gz / .tgz file: cached as arrays (`archive_cache.read`) or unpacked
  (`extract`)."""
  return str(path).endswith(_ARCHIVE_SUFFIXES)


@contextlib.contextmanager
def open_archive(archive):
  """The tarfile of `archive`; a damaged one (cut short, a bad gzip stream, not a tar) is a
  DataError naming it, wherever it is found while the block reads it (a block that trusts the
  contents ends with `read_to_end`). tarfile's own errors (EOFError, tarfile.ReadError,
  zlib.error, gzip's CRC check) do not name the file."""
  try:
    with tarfile.open(archive) as tar:
      yield tar
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise DataError(f"{archive} is damaged or incomplete ({logs.brief(e, 200)}); download or "
                    "copy it again (its size should match the original's).") from e


class _Damaged(tarfile.TarError):
  """Bytes after the last entry tarfile could read: a damaged header, where tarfile stops
  without a word."""


def read_to_end(tar):
  """Reads the rest of `tar` (inside `open_archive`): every header, then the bytes after the
  last one, which must be the end-of-archive zeros, to the end of the file, where gzip checks
  its CRC. Before an archive's contents are trusted: tarfile stops silently at a damaged header
  and never reaches the CRC, so a damaged archive would read as a smaller data set."""
  tar.getmembers()
  tar.fileobj.seek(tar.offset)
  while chunk := tar.fileobj.read(1 << 20):
    if chunk.strip(b"\0"):
      raise _Damaged(f"unreadable entry at byte {tar.offset} of its tar stream")


@functools.cache
def extract(archive: str) -> pathlib.Path:
  """Unpacks `archive` once per process into a temporary folder (never beside the archive)."""
  dest = pathlib.Path(tempfile.mkdtemp(prefix="sce_jax_"))
  atexit.register(shutil.rmtree, dest, ignore_errors=True)
  with open_archive(archive) as tar:
    tar.extractall(dest, filter="data")
    read_to_end(tar)
  return dest


def _listdir(folder: pathlib.Path):
  """(subfolder names, file names) of a folder."""
  entries = list(folder.iterdir())
  return [e.name for e in entries if e.is_dir()], [e.name for e in entries if e.is_file()]


def _has_images(files) -> bool:
  return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files)


def class_root(root, split: str, listdir=_listdir):
  """`root/split` when it exists, else `root` itself if it holds class folders.

  listdir(folder) -> (subfolder names, file names): a folder on disk by default, or an archive's
  listing (`archive_cache.read`).
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


def labelled(found, where, classes=None):
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
  unknown = [f"{name} ({len(found[name])} images)" for name in found
             if found[name] and name not in classes]
  if unknown:  # The training split has no such folder, or an empty one.
    raise DataError(f"{where} holds images of classes that the training split has no images "
                    f"of: {', '.join(unknown)}; add images of each to the training split, or "
                    "take that folder out of this split.")
  files, labels = [], []
  for label, name in enumerate(classes):
    files += found.get(name, [])
    labels += [label] * len(found.get(name, []))
  if not files:
    raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in class folders under {where}")
  return classes, files, np.asarray(labels, np.int32)


def split_path(path, names):
  """The first split of `names` beside training data `path` that exists, else None: a
  subfolder of a folder, or the archive named with the split in place of 'train'."""
  path = pathlib.Path(path)
  for name in names:
    if path.is_dir():
      candidate = path / name
    elif "train" in path.name:
      candidate = path.with_name(path.name.replace("train", name))
    else:
      continue
    if candidate.exists():
      return candidate
  return None


def find_eval_path(path, split: str = "test"):
  """Where the evaluation split of training data `path` lives: its `split` (else test, val,
  validation) by `split_path`."""
  found = split_path(path, (split,) + tuple(s for s in EVAL_SPLITS if s != split))
  if found is None:
    raise DataError(f"no {split!r} split found for {path}; set --config.data.eval_path=...")
  return found


def _listing(root):
  """({folder relative to root: its mtime in ns}, image files relative to root), the folders in
  sorted order of their paths and each folder's files sorted by name."""
  folders, found = {}, []
  for folder, _, files in os.walk(root):
    rel = os.path.normpath(os.path.relpath(folder, root))
    folders[rel] = os.stat(folder).st_mtime_ns
    found.append((rel, sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))))
  found.sort()
  return folders, [os.path.normpath(os.path.join(rel, f)) for rel, files in found for f in files]


def image_files(root, cache_dir=None) -> list[str]:
  """Every image file under `root`, at any depth, as paths relative to it, folder after folder
  in sorted order of their paths (as `sorted(os.walk(root))`), each folder's in name order.

  cache_dir: the listing is kept there (beside the array cache) and read back while no folder's
  modification time has changed: a file added, removed or renamed anywhere below changes its
  folder's, so a start checks the folders with one stat each instead of listing every file
  (millions for ImageNet; benchmarks/RESULTS.md, File lists). As git's index, a folder changed
  less than _RACY_NS before the listing began is not trusted (a file system stores times in
  coarse ticks), and the folder is listed again."""
  root = pathlib.Path(root).resolve()
  entry = None
  if cache_dir:
    cache_dir = pathlib.Path(cache_dir).expanduser()
    digest = hashlib.sha256(f"{root}\0{_LISTING_FORMAT}".encode()).hexdigest()[:16]
    entry = cache_dir / f"{root.name}.files.{digest}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
      cached = json.loads(entry.read_text())
      if all(os.stat(root / rel).st_mtime_ns == t < cached["listed_at"] - _RACY_NS
             for rel, t in cached["folders"].items()):
        return cached["files"]
  listed_at = time.time_ns()
  folders, files = _listing(root)
  if entry is not None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"folders": folders, "files": files, "listed_at": listed_at}))
    os.replace(tmp, entry)  # whole or absent, as the array cache's entries
    logging.info("Listed %d images under %s; the list is cached in %s.", len(files), root,
                 entry)
  return files


def archive_images(archive) -> list[str]:
  """The image files of `archive`, as paths inside it (one pass over its headers)."""
  with open_archive(archive) as tar:
    return [m.name for m in tar if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)]


def split_root(root, split):
  """Where a split's images are without class folders: `root/split` when it exists, else root."""
  return root / split if (root / split).is_dir() else root


def choose_labels(images, split) -> str:
  """data.labels='auto': 'folders' when every image (paths relative to the data path, `split`'s
  folder when there is one, an archive's single top folder set aside) sits one level below a
  class folder, `<class>/<image>`, of two or more; else 'none' (one folder of images is a flat
  folder, whatever its name)."""
  parts = [pathlib.PurePosixPath(p).parts for p in images]
  if any(len(p) > 1 and p[0] == split for p in parts):
    parts = [p[1:] for p in parts if p[0] == split]
  if len({p[0] for p in parts}) == 1 and all(len(p) > 2 for p in parts):
    parts = [p[1:] for p in parts]  # one top folder around it all
  classes = {p[0] for p in parts}
  return "folders" if len(classes) > 1 and all(len(p) == 2 for p in parts) else "none"


def read_list(path) -> list[str]:
  """The image paths of a text file, one a line (blank lines and '#' comments skipped); a
  relative path is relative to the file's folder. A line that is not an image path (another
  kind of file given as data.path) is a DataError."""
  path = pathlib.Path(path)
  try:
    lines = [line.strip() for line in path.read_text().splitlines()]
  except (UnicodeDecodeError, OSError) as e:
    lines = [f"<unreadable as text: {e}>"]
  files = []
  for n, line in enumerate(lines, 1):
    if not line or line.startswith("#"):
      continue
    if not line.lower().endswith(IMAGE_EXTENSIONS):
      raise DataError(f"{path} is neither a .tar, .tar.gz or .tgz archive nor a list of images "
                      f"(line {n}, {line[:80]!r}, is not a {'/'.join(IMAGE_EXTENSIONS)} path); "
                      "set --config.data.path to a folder of images, an archive of one, or a "
                      "text file of image paths.")
    files.append(str(path.parent / line))
  if not files:
    raise DataError(f"{path} lists no images; write one image path a line.")
  return files

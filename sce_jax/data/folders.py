"""The class-folder layout of a data set on disk or in an archive: where its splits and classes
are, and how its files are labelled (docs/SCE.md 6).

`root/<class>/<image>`, or `root/<split>/<class>/<image>`, or a .tar/.tar.gz of either. Classes
are the folders that hold images, sorted by name; another split is labelled by the training
split's classes.
"""
import atexit
import contextlib
import functools
import gzip
import pathlib
import shutil
import tarfile
import tempfile
import zlib

import numpy as np
from absl import logging

from sce_jax import logs
from sce_jax.data.images import IMAGE_EXTENSIONS, DataError

EVAL_SPLITS = ("test", "val", "validation")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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

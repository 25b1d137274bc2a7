"""Unlabelled data (data.labels, sources.ImageFolder, folders.choose_labels): flat and nested
folders, an archive of one and a file list train without labels; the evaluations that need
labels read a labelled set given apart (eval.data) or are skipped, saying why."""
import logging
import os
import tarfile
import time

import jax
import numpy as np
import pytest
from PIL import Image

from sce_jax import evaluators, metrics, sharding, train
from sce_jax.data import folders, sources
from tests.conftest import natural_image
from tests.helpers import load_config


def write_images(root, names, seed=0):
  """32x32 JPEGs at the relative paths `names` under root; returns root."""
  rng = np.random.default_rng(seed)
  for name in names:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(natural_image(rng, rng.uniform())).save(root / name, quality=75)
  return root


@pytest.mark.parametrize("images,labels", [
    (["a/1.jpg", "b/2.jpg"], "folders"),                         # class folders
    (["a/1.jpg", "a/2.jpg"], "none"),                            # one folder: flat
    (["train/a/1.jpg", "train/b/2.jpg", "test/a/3.jpg"], "folders"),  # split folders
    (["top/a/1.jpg", "top/b/2.jpg"], "folders"),                 # an archive's top folder
    (["1.jpg", "2.jpg"], "none"),                                # flat
    (["a/1.jpg", "2.jpg"], "none"),                              # an image beside the classes
    (["a/x/1.jpg", "b/y/2.jpg"], "none"),                        # nested, not classes
    (["train/1.jpg", "test/2.jpg"], "none"),                     # flat split folders
    ([], "none"),
])
def test_choose_labels(images, labels):
  assert folders.choose_labels(images, "train") == labels


def test_unlabelled_sources(tmp_path, caplog):
  """A flat folder, nested non-class folders, a .tar of a flat folder and a file list: every
  image, label 0, no classes; auto says which it chose; a class tree stays labelled."""
  caplog.set_level(logging.INFO)
  cfg = load_config("cifar10_r18", "smoke").data
  cfg.cache_dir = str(tmp_path / "cache")
  flat = write_images(tmp_path / "flat", [f"{i}.jpg" for i in range(5)])
  nested = write_images(tmp_path / "nested", ["a/x/1.jpg", "a/2.jpg", "b/y/z/3.jpg"])
  with tarfile.open(tmp_path / "flat.tar", "w") as tar:
    tar.add(flat, arcname="flat")
  (tmp_path / "list.txt").write_text(f"# images\n{flat}/0.jpg\n\nflat/3.jpg\n")
  for path, n in ((flat, 5), (nested, 3), (tmp_path / "flat.tar", 5),
                  (tmp_path / "list.txt", 2)):
    caplog.clear()
    cfg.path = str(path)
    train_split = sources.Splits(cfg).train
    assert (len(train_split), train_split.num_classes) == (n, 0), path
    assert not train_split.labels.any()
    assert f"data.labels=auto: {path} has no class folders; unlabelled" in caplog.text
    assert train_split[n - 1]["image"][:2] == b"\xff\xd8"  # a JPEG's bytes
  assert sources.ImageFolder(tmp_path / "list.txt", labels="none").paths[1] == str(
      tmp_path / "flat/3.jpg")
  classes = write_images(tmp_path / "classes", ["train/a/1.jpg", "train/b/2.jpg"])
  cfg.path = str(classes)
  assert sources.Splits(cfg).num_classes == 2
  cfg.labels = "none"
  assert sources.Splits(cfg).num_classes == 0


def test_without_labels_evaluations_are_skipped_in_one_line(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = load_config("cifar10_r18", "smoke")
  config.data.path = str(write_images(tmp_path / "flat", [f"{i}.jpg" for i in range(4)]))
  config.eval.knn.every_epochs = 0
  splits = sources.Splits(config.data)
  assert sources.labelled(splits, config.data, config.eval.data) is None
  assert evaluators.periodic(config, None, splits, None, 6) == []
  assert ("Skipping kNN and the online probe: the training data have no labels "
          "(--config.eval.data.path or eval.data.name gives kNN a labelled set).") in caplog.text


@pytest.mark.slow
def test_a_flat_folder_trains_and_knn_reads_a_labelled_set_apart(cifar_root, tmp_path):
  """64 images in one folder: pretraining runs (no probe: no labels), and kNN at the end reads
  the class folders of cifar_root (train as memory, test as queries) given in eval.data.path."""
  config = load_config("cifar10_r18", "smoke")
  config.data.path = str(write_images(tmp_path / "flat", [f"{i:03d}.jpg" for i in range(64)]))
  config.eval.data.path = str(cifar_root)
  config.eval.knn.every_epochs = 0  # at the end
  config.max_steps, config.log_every_steps = 2, 1
  train.train(config, tmp_path / "w", sharding.make_mesh(jax.devices()[:1]))
  logged = metrics.read(tmp_path / "w")
  assert sorted(logged) == [1, 2]
  assert "probe_loss" not in logged[1]
  assert 0 <= logged[2]["knn_top1"] <= logged[2]["knn_top5"] <= 1


def test_the_file_list_is_cached_until_a_folder_changes(tmp_path, monkeypatch):
  """The second listing is read from the cache (no walk); a file added or removed in a nested
  folder (its folder's mtime changes) is seen at the next start; class folders read the same
  list as without a cache."""
  root = write_images(tmp_path / "data", ["a/1.jpg", "a/x/2.jpg", "b/3.jpg"])
  for folder in (root, root / "a", root / "a/x", root / "b"):  # an hour old: not racy
    os.utime(folder, (time.time() - 3600,) * 2)
  cache = tmp_path / "cache"
  first = folders.image_files(root, cache)
  assert first == ["a/1.jpg", "a/x/2.jpg", "b/3.jpg"] == folders.image_files(root)
  walk = folders._listing  # pylint: disable=protected-access
  monkeypatch.setattr(folders, "_listing", lambda r: pytest.fail("listed again"))
  assert folders.image_files(root, cache) == first
  monkeypatch.setattr(folders, "_listing", walk)
  write_images(root, ["a/x/4.jpg"])
  assert folders.image_files(root, cache) == ["a/1.jpg", "a/x/2.jpg", "a/x/4.jpg", "b/3.jpg"]
  (root / "a/1.jpg").unlink()
  assert folders.image_files(root, cache) == ["a/x/2.jpg", "a/x/4.jpg", "b/3.jpg"]
  cached = sources.ImageFolder(root, cache_dir=cache)
  assert cached.paths == sources.ImageFolder(root).paths == [
      str(root / p) for p in ("a/x/2.jpg", "a/x/4.jpg", "b/3.jpg")]
  assert list(cached.labels) == [0, 0, 1] and cached.classes == ["a", "b"]

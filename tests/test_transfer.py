"""Linear transfer (ssl-transfer) and VOC07 low-shot SVMs (PCL): docs/SCE.md section 9."""
import io
import json
import logging
import os
import signal
import socket
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sce_jax import models, preemption
from sce_jax.data import images, sources
from sce_jax.evaluators import common, knn, transfer, voc07
from sce_jax.sharding import make_mesh
from tests.conftest import make_image_folder
from tests.helpers import load_config

pytest.importorskip("sklearn")


def _clusters(n, num_classes=3, dim=16, spread=0.3, seed=0):
  """Gaussian clusters around well-separated centres: (features, labels)."""
  rng = np.random.default_rng(seed)
  centres = np.eye(num_classes, dim) * 4
  labels = rng.integers(0, num_classes, n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


# --- Metrics, by hand.


def test_average_precision_by_hand():
  """Scores 0.9, 0.8, 0.7, 0.1 for labels 1, 0, 1, 0: precision 1, 1/2, 2/3, 1/2 at recall
  1/2, 1/2, 1, 1. Area under the non-increasing envelope (PCL): 1/2 x 1 + 1/2 x 2/3 = 5/6.
  11-point (ssl-transfer): t = 0 .. 0.5 reach precision 1, t = 0.6 .. 1 precision 2/3:
  (6 + 5 x 2/3) / 11 = 28/33."""
  positives, scores = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
  assert common.average_precision(positives, scores) == pytest.approx(5 / 6)
  assert common.average_precision(positives, scores, eleven_point=True) == pytest.approx(28 / 33)
  assert common.average_precision(positives, -scores) < 0.6  # the worst ranking
  assert common.average_precision(positives, positives + 0.0) == 1.0


def test_mean_per_class_accuracy_by_hand():
  """Class 0: 2 of 3 right, class 1: 1 of 1; the mean, 5/6, is not top-1's 3/4."""
  labels, predictions = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])
  assert transfer.mean_per_class_accuracy(labels, predictions) == pytest.approx(5 / 6)


# --- The protocol's grid, validation and refit.


def test_grid_selection_and_refit():
  """ssl-transfer's grid (torch.logspace(-6, 5, 45)) is walked in order on (train, val); the
  first of two tied best weight decays, 10^-2 (10^-1.75 ties), is refitted on trainval and
  scored on test."""
  config = load_config("cifar10_r18")
  grid = transfer.weight_decays(config.eval.transfer)
  np.testing.assert_allclose(grid, np.logspace(-6, 5, 45), rtol=1e-12)
  calls = []

  def fit_score(weight_decay, train, test):
    calls.append((weight_decay, train, test))
    return -abs(round(np.log10(weight_decay), 6) + 1.875) if test == "val" else 0.5

  sets = {"train": "train", "val": "val", "trainval": "trainval", "test": "test"}
  assert transfer.select_and_test(sets, grid, fit_score) == (0.5, pytest.approx(1e-2), -0.125)
  assert [c[0] for c in calls[:-1]] == list(grid)
  assert all(c[1:] == ("train", "val") for c in calls[:-1])
  assert calls[-1][1:] == ("trainval", "test") and calls[-1][0] == pytest.approx(1e-2)


def test_logistic_regression_separable_and_as_scikit_learn():
  """Separable clusters give 100 % by every metric; on overlapping clusters the protocol's test
  accuracy is scikit-learn's own fit with the chosen C on train + validation (warm starts
  change the path, not the optimum L-BFGS converges to)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  train, test = _clusters(300), _clusters(200, seed=1)
  for metric in ("top1", "mean_per_class"):
    fit_score = transfer.logistic_regression(metric, max_iter=100)
    assert fit_score(1e-3, train, test) == 1.0
  multi_label = lambda xy: (xy[0], np.eye(3, dtype=bool)[xy[1]])
  fit_score = transfer.logistic_regression("map11", max_iter=100)
  assert fit_score(1e-3, multi_label(train), multi_label(test)) == 1.0

  rows = lambda xy, s: (xy[0][s], xy[1][s])
  noisy, test = _clusters(400, spread=3.0, seed=2), _clusters(300, spread=3.0, seed=3)
  sets = {"train": rows(noisy, slice(100, None)), "val": rows(noisy, slice(100)),
          "trainval": noisy, "test": test}
  grid = np.logspace(-2, 4, 7)
  value, weight_decay, _ = transfer.select_and_test(
      sets, grid, transfer.logistic_regression("top1", max_iter=1000))
  assert weight_decay in grid
  direct = LogisticRegression(C=1 / weight_decay, max_iter=1000).fit(*noisy)
  assert value == float(np.mean(direct.predict(test[0]) == test[1]))
  assert 0.4 < value < 1.0  # overlapping: neither chance (1/3) nor perfect


def test_missing_scikit_learn_names_the_extra(tmp_path, monkeypatch):
  """Before anything is extracted: one line naming the extra."""
  monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
  with pytest.raises(common.MissingPackage, match=r"pip install 'sce_jax\[eval\]'"):
    transfer.evaluate(_config(tmp_path, "cifar10"), None, None, None, tmp_path)
  assert not (tmp_path / "transfer").exists()


def test_parse_datasets():
  assert transfer.parse_datasets("cifar10, voc/2007,aircraft=/data/fgvc") == [
      ("cifar10", ""), ("voc/2007", ""), ("aircraft", "/data/fgvc")]
  for bad, message in (("aircraft", "name a local copy as aircraft=PATH"),
                       ("imagenet", "not a TFDS set of the protocol"),
                       ("cifar10,cifar10=/x", "names 'cifar10' twice"), ("=x", "not NAME=PATH"),
                       ("voc/2007=/x", "multi-label and read from TFDS only"),
                       (" , ", "is empty")):
    with pytest.raises(ValueError, match=message):
      transfer.parse_datasets(bad)


# --- End to end on a tiny random trunk.


def _config(tmp_path, datasets):
  config = load_config("cifar10_r18", "smoke")
  config.model.width = 2
  config.eval.batch_size = 64
  config.eval.transfer.datasets = datasets
  config.eval.transfer.wd_values = 4  # 1e-6, 1e-1.33, 1e3.33, 1e5: a grid, quickly
  config.data.cache_dir = str(tmp_path / "cache")
  return config


@pytest.fixture(scope="module")
def trunk_variables(tmp_path_factory):
  """A tiny random trunk, the one `_config` builds."""
  trunk = models.make_trunk(_config(tmp_path_factory.mktemp("unused"), "").model)
  return jax.jit(trunk.init, static_argnames="train")(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_transfer_folders_resume_between_sets(cifar_root, tmp_path, trunk_variables,
                                              monkeypatch, caplog):
  """Two class-folder sets, one with a validation split of its own (mean per-class accuracy,
  as FGVC-Aircraft) and one without (top-1, 20 % of train held out). A run stopped while
  extracting the second set's features keeps the first's result and features; run again, it
  extracts only the missing splits and solves only the second set; a third run extracts and
  solves nothing and reports the same values."""
  own_val = make_image_folder(tmp_path / "own_val", {"train": 6, "val": 4, "test": 4},
                              classes=("a", "b", "c"), seed=1)
  config = _config(tmp_path, f"cifar10={cifar_root},aircraft={own_val}")
  mesh, work = make_mesh(), tmp_path / "work"
  extracted, solved = [], []
  real_extract, real_solve = common.extract_features, transfer._solve

  def extract(trunk, variables, source, *args, **kwargs):
    extracted.append(source.num_examples)
    if stop_at and len(extracted) == stop_at:
      raise KeyboardInterrupt
    return real_extract(trunk, variables, source, *args, **kwargs)

  monkeypatch.setattr(common, "extract_features", extract)
  monkeypatch.setattr(transfer, "_solve", lambda *a: solved.append(a[0]) or real_solve(*a))
  stop_at = 4  # cifar10: train, test; aircraft: train, then stopped at its test split
  with pytest.raises(KeyboardInterrupt):
    transfer.evaluate(config, trunk_variables, mesh, None, work)
  record = json.loads((work / "transfer" / "results.json").read_text())
  assert list(record) == ["cifar10"] and extracted == [200, 100, 18, 12] and solved == ["cifar10"]

  stop_at, extracted[:], solved[:] = 0, [], []
  caplog.set_level(logging.INFO)
  results = transfer.evaluate(config, trunk_variables, mesh, None, work)
  assert extracted == [12, 12] and solved == ["aircraft"]  # test and val; train was cached
  record = json.loads((work / "transfer" / "results.json").read_text())
  assert record["cifar10"]["metric"] == "top1" and record["aircraft"]["metric"] == (
      "mean_per_class")
  assert record["cifar10"]["sizes"] == {"train": 160, "val": 40, "trainval": 200, "test": 100}
  assert record["aircraft"]["sizes"] == {"train": 18, "val": 12, "trainval": 30, "test": 12}
  for name in ("cifar10", "aircraft"):
    entry = record[name]
    assert 0 <= entry["value"] <= 1 and results[f"transfer_{name}"] == entry["value"]
    assert entry["weight_decay"] in transfer.weight_decays(config.eval.transfer)
    assert entry["C"] == pytest.approx(1 / entry["weight_decay"])
  assert results["transfer_mean"] == pytest.approx(
      (record["cifar10"]["value"] + record["aircraft"]["value"]) / 2)
  assert "| cifar10 | top-1 |" in caplog.text and "| 94.8 |" in caplog.text

  extracted[:], solved[:] = [], []
  assert transfer.evaluate(config, trunk_variables, mesh, None, work) == results
  assert extracted == [] and solved == []
  assert sorted(p.name for p in (work / "transfer" / "aircraft").iterdir()) == [
      "features_test_32px.npz", "features_train_32px.npz", "features_val_32px.npz"]
  assert record["aircraft"]["image_size"] == 32


def test_missing_transfer_set_names_its_key(cifar_root, tmp_path, trunk_variables):
  """A NAME=PATH entry whose PATH does not exist is named under eval.transfer.datasets (not
  data.path, which the folder source would blame), before any set is extracted."""
  missing = tmp_path / "nowhere"
  config = _config(tmp_path, f"cifar10={cifar_root},aircraft={missing}")
  with pytest.raises(images.DataError) as e:
    transfer.evaluate(config, trunk_variables, make_mesh(), None, tmp_path / "work")
  assert str(e.value).startswith(f"eval.transfer.datasets: aircraft={missing} does not exist; "
                                 "set --config.eval.transfer.datasets to NAME=PATH")
  assert "data.path" not in str(e.value) and not (tmp_path / "work").exists()


@pytest.mark.slow  # 4 extractions and 2 solves, ~50 s on 2 loaded cores
def test_transfer_and_knn_stop_at_a_safe_point(cifar_root, tmp_path, trunk_variables,
                                               monkeypatch):
  """A SIGTERM while the first set's train features are extracted stops the run once they are
  saved (Preempted: exit 75, as pretraining after its checkpoint); a Ctrl-C while the first set
  is solved stops it once that set is recorded; each rerun goes on from there. kNN, which
  saves nothing, stops between its two splits (Stopped: exit 130 for a Ctrl-C)."""
  config = _config(tmp_path, f"cifar10={cifar_root},again={cifar_root}")
  mesh, work = make_mesh(), tmp_path / "work"
  extracted, solved, signals = [], [], {}
  real_extract, real_solve = common.extract_features, transfer._solve

  def extract(trunk, variables, source, *args, **kwargs):
    extracted.append(source.num_examples)
    os.kill(os.getpid(), signals.pop("extract", 0))
    return real_extract(trunk, variables, source, *args, **kwargs)

  def solve(*args):
    solved.append(args[0])
    os.kill(os.getpid(), signals.pop("solve", 0))
    return real_solve(*args)

  monkeypatch.setattr(common, "extract_features", extract)
  monkeypatch.setattr(transfer, "_solve", solve)
  runs = [("extract", signal.SIGTERM, "Preempted \\(SIGTERM\\): stopped after saving the train "
           "features of cifar10 to .*features_train_32px.npz; rerun", [200], []),
          ("solve", signal.SIGINT, "Interrupted \\(Ctrl-C\\): stopped after transfer to "
           "cifar10, recorded in .*results.json; rerun", [100], ["cifar10"])]
  for stage, signum, message, extracted_now, solved_now in runs:
    assert preemption.install()
    try:
      signals[stage], extracted[:], solved[:] = signum, [], []
      with pytest.raises(preemption.Preempted, match=f"^{message}"):
        transfer.evaluate(config, trunk_variables, mesh, None, work)
    finally:
      preemption.uninstall()
    assert extracted == extracted_now and solved == solved_now
  extracted[:] = []
  results = transfer.evaluate(config, trunk_variables, mesh, None, work)
  assert extracted == [200, 100] and solved == ["cifar10", "again"]
  assert results["transfer_cifar10"] == results["transfer_again"]  # the same images

  splits = types.SimpleNamespace(train="train", eval="eval", num_classes=3)
  monkeypatch.setattr(common, "extract_features", lambda *a, **k: os.kill(
      os.getpid(), signal.SIGINT) or (np.eye(4, 8, dtype=np.float32), np.arange(4) % 3))
  assert preemption.install()
  try:
    with pytest.raises(preemption.Stopped, match=r"^Interrupted \(Ctrl-C\) during the kNN "
                       "evaluation: stopped at once") as e:
      knn.evaluate(config, trunk_variables, mesh, splits)
  finally:
    preemption.uninstall()
  assert e.value.signum == signal.SIGINT


def _jpeg(rng):
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buffer, "JPEG")
  return buffer.getvalue()


def _mock_voc(tfds, tf, n=40):
  """tfds.testing.mock_data for voc/2007 (its random examples break on the nested 'objects'):
  n JPEGs a split, image i showing (non-difficult) classes i % 20 and (i + 7) % 20, so that each
  class has n / 10 positives."""

  def as_dataset(self, split, **kwargs):
    del self, kwargs
    rng = np.random.default_rng(len(split))
    examples = [{"image": _jpeg(rng), "labels_no_difficult": np.array([i % 20, (i + 7) % 20])}
                for i in range(n)]
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature={
        "image": tf.TensorSpec([], tf.string),
        "labels_no_difficult": tf.TensorSpec([None], tf.int64)})
  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_transfer_tfds_sets(tmp_path, trunk_variables, monkeypatch):
  """TFDS sets through tfds.testing.mock_data: CIFAR-10 (top-1, 20 % of train held out), then
  VOC2007 (11-point mAP of 20 binary fits; its own validation split; multi-label targets from
  labels_no_difficult) in the same workdir, CIFAR-10 being done already."""
  tfds = pytest.importorskip("tensorflow_datasets")
  tf = pytest.importorskip("tensorflow")
  # The mock has no split metadata: a split's size is its length.
  monkeypatch.setattr(sources.Tfds, "num_examples", property(len))
  monkeypatch.setattr(socket, "create_connection", lambda address, timeout: io.BytesIO())
  mesh, work = make_mesh(), tmp_path / "work"
  with tfds.testing.mock_data(num_examples=40):
    first = transfer.evaluate(_config(tmp_path, "cifar10"), trunk_variables, mesh, None, work)
  with _mock_voc(tfds, tf):
    results = transfer.evaluate(_config(tmp_path, "cifar10,voc/2007"), trunk_variables, mesh,
                                None, work)
  record = json.loads((work / "transfer" / "results.json").read_text())
  assert record["cifar10"]["sizes"] == {"train": 32, "val": 8, "trainval": 40, "test": 40}
  assert results["transfer_cifar10"] == first["transfer_cifar10"]
  assert record["voc/2007"]["metric"] == "map11"
  assert record["voc/2007"]["sizes"] == {"train": 40, "val": 40, "trainval": 80, "test": 40}
  assert 0 < results["transfer_voc/2007"] <= 1
  targets = np.load(work / "transfer" / "voc_2007" / "features_test_32px.npz")["targets"]
  assert targets.shape == (40, 20) and (targets.sum(axis=1) == 2).all()
  assert targets[3, [3, 10]].all()


# --- VOC07 SVMs.


def test_low_shot_draws_k_images_of_each_class():
  targets = np.eye(5, dtype=bool)[np.arange(60) % 5]
  targets[:, 4] |= targets[:, 0]  # images of class 0 also show class 4
  rows = voc07.low_shot(targets, 3, np.random.default_rng(0))
  assert len(rows) == 15
  for c in range(5):
    assert targets[rows[3 * c:3 * c + 3], c].all()
  assert not np.array_equal(rows, voc07.low_shot(targets, 3, np.random.default_rng(1)))


def test_svm_map_separable():
  """One SVM a class on L2-normalised separable clusters: test mAP 100 %; the cost of each
  class is one of the grid."""
  (x, y), (x_test, y_test) = _clusters(120), _clusters(60, seed=1)
  multi_label = lambda labels: np.eye(3, dtype=bool)[labels]
  value, costs = voc07.svm_map((voc07.normalize(x), multi_label(y)),
                               (voc07.normalize(x_test), multi_label(y_test)), (0.1, 1.0), 3)
  assert value == 1.0 and set(costs) <= {0.1, 1.0} and len(costs) == 3


def test_voc07_svm_end_to_end(tmp_path, trunk_variables, caplog, monkeypatch):
  """PCL's protocol on mocked VOC2007: 2 draws of 2 images a class and all trainval images
  (train + validation), features cached; the table names the published row."""
  # mock_data leaves the set unprepared: the offline check would probe the download host.
  monkeypatch.setattr(socket, "create_connection", lambda address, timeout: io.BytesIO())
  tfds = pytest.importorskip("tensorflow_datasets")
  tf = pytest.importorskip("tensorflow")
  config = _config(tmp_path, "cifar10")
  config.eval.voc07.update(shots=(2,), samples=2, costs=(0.1, 1.0), folds=2)
  caplog.set_level(logging.INFO)
  with _mock_voc(tfds, tf):
    results = voc07.evaluate(config, trunk_variables, make_mesh(), None, tmp_path / "work")
  assert set(results) == {"voc07_map_k2", "voc07_map_k2_std", "voc07_map_full"}
  assert 0 < results["voc07_map_k2"] <= 1 and 0 < results["voc07_map_full"] <= 1
  assert results["voc07_map_k2_std"] >= 0
  assert sorted(p.name for p in (tmp_path / "work" / "voc07_svm").glob("*.npz")) == [
      "features_test_32px.npz", "features_train_32px.npz", "features_validation_32px.npz"]
  assert "| all |" in caplog.text and "88.24" in caplog.text

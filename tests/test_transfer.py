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
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sce_jax import config as sce_config
from sce_jax import evaluators, models, preemption
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


def test_trunk_checksum_names_the_weights(trunk_variables):
  """One digest of the trunk's arrays: the same for a copy, another for other weights."""
  digest = common.trunk_checksum(trunk_variables)
  assert len(digest) == 16 and digest == common.trunk_checksum(jax.device_get(trunk_variables))
  moved = jax.tree.map(np.array, trunk_variables)  # writable host copies
  jax.tree.leaves(moved)[0].flat[0] += 1
  assert common.trunk_checksum(moved) != digest


def test_missing_scikit_learn_names_the_extra(tmp_path, monkeypatch):
  """Before anything is extracted: one line naming the extra."""
  monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
  with pytest.raises(common.MissingPackage, match=r"pip install 'sce_jax\[eval\]'"):
    transfer.evaluate(_config(tmp_path, "cifar10"), None, None, None, tmp_path)
  assert not (tmp_path / "transfer").exists()


def test_default_datasets_are_the_tfds_sets():
  """eval.transfer.datasets' default (config.py, which imports no evaluator) is every set of
  the protocol that TFDS has; FGVC-Aircraft is added as NAME=PATH."""
  assert sce_config.TRANSFER_DATASETS == ",".join(
      name for name, p in transfer.PROTOCOLS.items() if p.tfds)


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


# --- The splits and fits of the published row (issue 30).


def _reference_caltech101_split(paths, num_train_per_class=30):
  """ssl-transfer's `create_caltech101_splits` (datasets/caltech101.py) as its statement
  reads, on 'folder/file' paths instead of a directory: torchvision's ImageFolder lists the
  class folders sorted, then each folder's files sorted; np.random.seed(0); each class draws
  np.random.choice(its indices, 30) (with replacement), sorted; test is the rest. Its
  train.txt (since commit 416913f) lists each drawn image once, in that order."""
  classes = sorted({p.split("/")[0] for p in paths})
  image_ids = sorted(paths, key=lambda p: (classes.index(p.split("/")[0]), p.split("/")[1]))
  labels = [classes.index(p.split("/")[0]) for p in image_ids]
  class_idxs = {label: [] for label in range(len(classes))}
  for i, label in enumerate(labels):
    class_idxs[label].append(i)
  state = np.random.get_state()
  np.random.seed(0)
  train_idxs = []
  for i in class_idxs:
    train_idxs.extend(np.sort(np.random.choice(class_idxs[i], num_train_per_class)))
  np.random.set_state(state)
  test_idxs = set(range(len(labels))) - set(train_idxs)
  train = list(dict.fromkeys(image_ids[i] for i in train_idxs))
  return train, {image_ids[i] for i in test_idxs}


def test_ssl_transfer_split_follows_the_reference_script():
  """Classes of 5 to 60 images (capitalised names sort first, as in Caltech-101's folders),
  given in a shuffled order: the same train images, in the same order, and test images as the
  reference script; classes smaller than 30 images keep none for test."""
  rng = np.random.default_rng(0)
  sizes = {"Faces": 41, "BACKGROUND_Google": 60, "accordion": 5, "ant": 33, "zebra": 47}
  paths = [f"{c}/image_{j:04d}.jpg" for c, n in sizes.items() for j in range(1, n + 1)]
  paths = [paths[i] for i in rng.permutation(len(paths))]
  folders, files = zip(*(p.split("/") for p in paths))
  train, test = transfer.ssl_transfer_split(folders, files)
  ref_train, ref_test = _reference_caltech101_split(paths)
  assert [paths[i] for i in train] == ref_train
  assert {paths[i] for i in test} == ref_test and len(test) == len(ref_test)
  assert not any(paths[i].startswith("accordion/") for i in test)
  assert len(train) < 30 * len(sizes)  # with replacement: fewer distinct than drawn


# Caltech-101's images per class folder, in ImageFolder's order (BACKGROUND_Google, Faces,
# Faces_easy, Leopards, Motorbikes, accordion, ...): ssl-transfer's train.txt + test.txt.
CALTECH101_SIZES = (
    467, 435, 435, 200, 798, 55, 800, 42, 42, 47, 54, 46, 33, 128, 98, 43, 85, 91, 50, 43, 123,
    47, 59, 62, 107, 47, 69, 73, 70, 50, 51, 57, 67, 52, 65, 68, 75, 64, 53, 64, 85, 67, 67, 45,
    34, 34, 51, 99, 100, 42, 54, 88, 80, 31, 64, 86, 114, 61, 81, 78, 41, 66, 43, 40, 87, 32,
    76, 55, 35, 39, 47, 38, 45, 53, 34, 57, 82, 59, 49, 40, 63, 39, 84, 57, 35, 64, 45, 86, 59,
    64, 35, 85, 49, 86, 75, 239, 37, 59, 34, 56, 39, 60)


def test_ssl_transfer_split_of_caltech101_sizes():
  """On Caltech-101's class sizes the law gives ssl-transfer's 2,416 train / 6,728 test images,
  17 to 30 distinct training images a class (TFDS's split: 3,060 / 6,084)."""
  assert len(CALTECH101_SIZES) == 102 and sum(CALTECH101_SIZES) == 9144
  folders = np.repeat([f"c{i:03d}" for i in range(102)], CALTECH101_SIZES)
  files = np.concatenate([[f"image_{j:04d}.jpg" for j in range(1, n + 1)]
                          for n in CALTECH101_SIZES])
  train, test = transfer.ssl_transfer_split(folders, files)
  assert (len(train), len(test)) == (2416, 6728)
  per_class = np.unique(folders[train], return_counts=True)[1]
  assert (per_class.min(), per_class.max()) == (17, 30)


def test_protocol_of_each_set():
  """What results.json and the table record beside a number: Caltech-101's split by
  eval.transfer.caltech101_split (TFDS's sets and folders their own), VOC2007's C x 2."""
  cfg = load_config("cifar10_r18").eval.transfer
  assert cfg.caltech101_split == "ssl_transfer"
  entry = lambda name, path="": {"protocol": transfer.protocol(name, path, cfg)}
  assert transfer.protocol_words(entry("caltech101")) == "ssl-transfer's split"
  assert transfer.protocol_words(entry("caltech101", "/data/caltech")) == "folders"
  assert transfer.protocol_words(entry("voc/2007")) == "TFDS split, C x 2"
  cfg.caltech101_split = "tfds"
  assert transfer.protocol_words(entry("caltech101")) == "TFDS split"


def test_caltech101_from_tfds_in_ssl_transfer_split(monkeypatch):
  """TFDS's Caltech-101 (mocked: three classes, lower-cased labels as TFDS names them) re-split:
  the train and test sources hold the images of the reference script run on the original
  folder names (BACKGROUND_Google and Faces sort before accordion), each image in one."""
  tfds = pytest.importorskip("tensorflow_datasets")
  tf = pytest.importorskip("tensorflow")
  monkeypatch.setattr(socket, "create_connection", lambda address, timeout: io.BytesIO())
  sizes = {"background_google": 34, "faces": 31, "accordion": 36}
  rng = np.random.default_rng(0)
  jpegs = {}

  def as_dataset(self, split, **kwargs):
    assert split == "train+test"
    names = self.info.features["label"].names
    examples = [{"image": jpegs.setdefault((c, j), _jpeg(rng)), "label": names.index(c),
                 "image/file_name": f"image_{j:04d}.jpg"}
                for c, n in sizes.items() for j in range(n, 0, -1)]
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature={
        "image": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int64),
        "image/file_name": tf.TensorSpec([], tf.string)})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    train, test = transfer.caltech101_ssl_transfer("")
  paths = [f"{transfer.CALTECH101_FOLDERS.get(c, c)}/image_{j:04d}.jpg"
           for c, n in sizes.items() for j in range(1, n + 1)]
  ref_train, ref_test = _reference_caltech101_split(paths)
  key = {jpegs[c, j]: f"{transfer.CALTECH101_FOLDERS.get(c, c)}/image_{j:04d}.jpg"
         for c, j in jpegs}
  assert [key[image] for image in train.images] == ref_train
  assert {key[image] for image in test.images} == ref_test
  assert len(train) + len(test) == sum(sizes.values())
  assert train.classes == test.classes and len(train.classes) == 102


def test_binary_fit_at_twice_c_is_ssl_transfers_multinomial_fit():
  """ssl-transfer's LogisticRegression(multi_class='multinomial') on a binary target minimises
  C sum_i -log softmax(W x_i + b)[y_i] + |W|^2 / 2 over two rows w0, w1; its optimum has
  w0 = -w1, so w1 - w0 and b1 - b0 are the binary fit's at 2C (`transfer.c_of`). Stated here
  by minimising the multinomial objective with SciPy's L-BFGS against scikit-learn's binary fit
  (scikit-learn >= 1.7 has no multinomial two-class fit). Tolerance: both solvers stop at
  gradients of 1e-10 (gtol, tol); the curvature is >= 1 along the weights (the L2 term) and
  C sum_i p_i (1 - p_i) (about 1 on these overlapping clusters) along the intercept, so each
  is within ~1e-9 of the optimum; 1e-5 leaves room for the solvers' stopping rules."""
  from scipy import optimize, special  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  x, y = _clusters(80, num_classes=2, dim=5, spread=2.0)
  c = 0.3

  def multinomial(theta):
    w, b = theta[:10].reshape(2, 5), theta[10:]
    logits = x.astype(np.float64) @ w.T + b
    loss = -np.sum(special.log_softmax(logits, axis=1)[np.arange(len(y)), y])
    p = special.softmax(logits, axis=1) - np.eye(2)[y]
    return c * loss + 0.5 * np.sum(w ** 2), np.concatenate([(c * p.T @ x + w).ravel(),
                                                            c * p.sum(0)])

  theta = optimize.minimize(multinomial, np.zeros(12), jac=True, method="L-BFGS-B",
                            options={"gtol": 1e-10, "ftol": 0, "maxiter": 10_000}).x
  w, b = theta[:10].reshape(2, 5), theta[10:]
  binary = LogisticRegression(C=transfer.c_of("map11", 1 / c), tol=1e-10,
                              max_iter=10_000).fit(x.astype(np.float64), y)
  np.testing.assert_allclose(w[1], -w[0], atol=1e-5)
  np.testing.assert_allclose(w[1] - w[0], binary.coef_[0], atol=1e-5)
  np.testing.assert_allclose(b[1] - b[0], binary.intercept_[0], atol=1e-5)
  assert transfer.c_of("top1", 1 / c) == pytest.approx(c)  # multi-class sets: C itself
  binary_at_c = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
  assert np.abs(binary_at_c.coef_[0] - binary.coef_[0]).max() > 1e-2  # the factor matters


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
  assert "| cifar10 | top-1 | folders |" in caplog.text and "| 94.8 |" in caplog.text
  assert record["aircraft"]["protocol"] == {"split": "folder", "C": "1 / weight decay"}

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
  assert record["voc/2007"]["protocol"] == {"split": "tfds", "C": "2 / weight decay"}
  assert record["voc/2007"]["C"] == pytest.approx(2 / record["voc/2007"]["weight_decay"])
  assert record["cifar10"]["protocol"] == {"split": "tfds", "C": "1 / weight decay"}
  assert record["voc/2007"]["sizes"] == {"train": 40, "val": 40, "trainval": 80, "test": 40}
  assert 0 < results["transfer_voc/2007"] <= 1
  targets = np.load(work / "transfer" / "voc_2007" / "features_test_32px.npz")["targets"]
  assert targets.shape == (40, 20) and (targets.sum(axis=1) == 2).all()
  assert targets[3, [3, 10]].all()

  # What eval_transfer.json records beside the numbers (evaluators.provenance).
  record = evaluators.provenance(_config(tmp_path, "cifar10,voc/2007"), "transfer",
                                 trunk_variables, None, work)
  assert record["protocol"]["eval.transfer"]["caltech101_split"] == "ssl_transfer"
  assert record["protocol"]["sets"]["voc/2007"] == {"split": "tfds", "C": "2 / weight decay"}
  assert record["protocol"]["data"]["image_size"] == 32
  assert record["split_sizes"]["voc/2007"] == {"train": 40, "val": 40, "trainval": 80,
                                               "test": 40}
  assert record["trunk_sha256"] == common.trunk_checksum(trunk_variables)
  assert {"python", "jax", "numpy", "scikit-learn"} <= set(record["versions"])


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


def _pcl_ap(targets, preds):
  """PCL's get_precision_recall + calculate_ap (eval_svm_voc.py), as written there."""
  targets = np.array(targets > 0, dtype=np.float32)
  ind = np.argsort(preds)[::-1]
  tp = targets[ind].astype(np.float64)
  fp = 1.0 - tp
  precision = np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))
  recall = np.cumsum(tp) / np.sum(targets)
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = max(mpre[i], mpre[i + 1])
  indices = np.where(mrec[1:] != mrec[:-1])[0] + 1
  return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in indices)


def test_best_on_test_is_pcls_reporting():
  """PCL's main(), on 3 draws of overlapping multi-label clusters: for each cost of its list,
  20 (here 4) LinearSVCs per draw, mAP in percent, averaged over the draws; result[k] is the
  best of those means. The "best_on_test" rule gives that mean, its cost, and the draws' mAPs
  at it. (PCL redraws the K-shot set for each cost, its RNG running on; here both rules see
  the same draws.) The "cv" rule is `svm_map` on each draw. Tolerance: the same float64 SVMs
  and two computations of one AP (sums of <= 60 terms in [0, 1]): ~1e-14."""
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  test_x, test_y = _clusters(120, num_classes=4, spread=2.0, seed=9)
  test = voc07.normalize(test_x), np.eye(4, dtype=bool)[test_y] | (rng.random((120, 4)) < 0.1)
  draws = []
  for seed in range(3):
    x, y = _clusters(40, num_classes=4, spread=2.0, seed=seed)
    draws.append((voc07.normalize(x), np.eye(4, dtype=bool)[y]))
  costs = (0.001, 0.1, 10.0)
  result_k = []
  for cost in costs:
    avg_map = []
    for train_feats, train_targets in draws:
      train_labels = np.where(train_targets, 1, -1)
      test_labels = np.where(test[1], 1, -1)
      cls_ap = [100 * _pcl_ap(test_labels[:, cls], LinearSVC(
          C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
          loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000, random_state=0).fit(
              train_feats, train_labels[:, cls]).decision_function(test[0]))
                for cls in range(4)]
      avg_map.append(np.mean(cls_ap))
    result_k.append(np.mean(avg_map))
  assert len(set(np.round(result_k, 6))) == 3  # the cost matters here

  cfg = ml_collections.ConfigDict(dict(cost_rule="best_on_test", costs=costs, folds=3))
  maps, cost = voc07.draw_maps(draws, test, cfg)
  assert cost == costs[int(np.argmax(result_k))]
  assert 100 * np.mean(maps) == pytest.approx(max(result_k), abs=1e-10)
  assert len(maps) == 3

  cfg.cost_rule = "cv"
  maps, chosen = voc07.draw_maps(draws, test, cfg)
  assert maps == [voc07.svm_map(d, test, costs, 3)[0] for d in draws]
  assert len(chosen) == 3 and all(len(c) == 4 and set(c) <= set(costs) for c in chosen)


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
  assert "sce_jax, costs cross-validated |" in caplog.text

  caplog.clear()  # PCL's rule on the cached features: both columns in the table
  config.eval.voc07.cost_rule = "best_on_test"
  with _mock_voc(tfds, tf):
    best = voc07.evaluate(config, trunk_variables, make_mesh(), None, tmp_path / "work")
  assert set(best) == {"voc07_map_k2_best_on_test", "voc07_map_k2_std_best_on_test",
                       "voc07_map_full_best_on_test"}
  record = json.loads((tmp_path / "work" / "voc07_svm" / "results.json").read_text())
  assert set(record) == {"cv", "best_on_test"} and record["cv"]["voc07_map_k2"] == (
      results["voc07_map_k2"])
  assert record["best_on_test"]["costs"]["full"] in (0.1, 1.0)
  assert record["cv"]["sizes"] == {"trainval": 80, "test": 40}
  assert ("| images per class | sce_jax, costs cross-validated | sce_jax, cost best on test "
          "(PCL's rule) | SCE, published (PCL's rule) |") in caplog.text
  record = evaluators.provenance(config, "voc07_svm", trunk_variables, None, tmp_path / "work")
  assert record["protocol"]["eval.voc07"]["cost_rule"] == "best_on_test"
  assert record["split_sizes"] == {"trainval": 80, "test": 40}

"""VOC07 low-shot linear SVMs (docs/SCE.md section 9): PCL's `eval_svm_voc.py`.

salesforce/PCL's protocol, which SCE's VOC07 row used: the frozen trunk's features of VOC2007
trainval and test (resize 256, centre crop 224: the evaluation crop of data.image_size),
L2-normalised; per class, one linear SVM (scikit-learn's LinearSVC with PCL's settings) on
+1 / -1 labels, scored on test by average precision; mAP over the 20 classes. Low-shot: K
training images drawn per class (PCL's `convert_low_shot`), several independent draws, mean
and spread. Each class's cost is chosen among eval.voc07.costs by k-fold cross-validation of
the average precision on the training images (Goyal et al. 2019's benchmark); PCL's script
instead reports the best of its cost list on the test set.
"""
import warnings

import jax
import numpy as np
from absl import logging
from etils import epath

from sce_jax import models
from sce_jax.data import sources
from sce_jax.evaluators import common

# SCE's published row (CEA-LIST/SCE README, PCL's code), mAP percent, by images per class.
PUBLISHED = {16: 79.47, 32: 83.05, 64: 85.47, "full": 88.24}
NAME = "voc/2007"


def low_shot(targets, k, rng):
  """Rows of PCL's K-shot training set: for each class in turn, `k` of the images that show
  it drawn at random; an image drawn for two classes is there twice, as in PCL."""
  return np.concatenate([rng.permutation(np.flatnonzero(targets[:, c]))[:k]
                         for c in range(targets.shape[1])])


def normalize(features):
  """PCL's L2 normalisation, x / (||x|| + 1e-5)."""
  return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def svm_map(train, test, costs, folds):
  """(mAP, chosen cost of each class): per class, PCL's LinearSVC (C the cost, positives
  weighted 2, squared hinge, dual, tol 1e-4, 2000 iterations) with the cost of best mean
  `folds`-fold cross-validated average precision on `train`, refitted on all of it; its
  decision function's AP on `test` (PCL's all-point interpolated AP). train, test: (features,
  (N, C) bool targets)."""
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import cross_val_score  # pylint: disable=g-import-not-at-top
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  (x, targets), (x_test, targets_test) = train, test
  svm = lambda cost: LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0,
                               penalty="l2", loss="squared_hinge", tol=1e-4, dual=True,
                               max_iter=2000, random_state=0)
  aps, chosen = [], []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    for c in range(targets.shape[1]):
      y = np.where(targets[:, c], 1, -1)
      cv = [cross_val_score(svm(cost), x, y, cv=folds, scoring="average_precision").mean()
            for cost in costs]
      cost = costs[int(np.argmax(cv))]
      scores = svm(cost).fit(x, y).decision_function(x_test)
      aps.append(common.average_precision(targets_test[:, c], scores))
      chosen.append(cost)
  return float(np.mean(aps)), chosen


def table(results, shots):
  """Markdown: our mAP (mean +- std over the draws) beside SCE's published row, percent."""
  rows = ["| images per class | sce_jax | SCE, published |", "|---|---|---|"]
  for k in shots:
    rows.append(f"| {k} | {100 * results[f'voc07_map_k{k}']:.2f} +- "
                f"{100 * results[f'voc07_map_k{k}_std']:.2f} | {PUBLISHED.get(k, '-')} |")
  rows.append(f"| all | {100 * results['voc07_map_full']:.2f} | {PUBLISHED['full']} |")
  return "\n".join(rows)


def evaluate(config, trunk_variables, mesh, splits, workdir):
  """VOC07 SVMs (docs/SCE.md 9) on the frozen trunk's features of TFDS voc/2007, cached in
  <workdir>/voc07_svm/; returns voc07_map_k<K> and its _std (over eval.voc07.samples draws) for
  each K of eval.voc07.shots, and voc07_map_full, in [0, 1]. The features are cached by
  data.image_size. `splits` is not read."""
  del splits
  common.import_sklearn()
  cfg = config.eval.voc07
  outdir = epath.Path(workdir) / "voc07_svm"
  common.pin_trunk(outdir, trunk_variables, "VOC07 features")
  trunk = models.make_trunk(config.model)
  data = common.data_config(config.data, cache=False)

  def extract(split):
    source, multi_label = sources.multi_label_tfds(NAME, split, config.data.data_dir)
    feats, rows = common.extract_features(trunk, trunk_variables, source, data,
                                          batch_size=config.eval.batch_size, mesh=mesh)
    return feats, multi_label[rows]

  size = config.data.image_size
  features = {split: common.cached_features(outdir / f"features_{split}_{size}px.npz",
                                            lambda split=split: extract(split))
              for split in ("train", "validation", "test")}
  if jax.process_index() > 0:
    return {}
  trainval = [np.concatenate(a) for a in zip(features["train"], features["validation"])]
  trainval[0] = normalize(trainval[0])
  test = normalize(features["test"][0]), features["test"][1]
  results = {}
  for k in cfg.shots:
    maps = [svm_map([a[low_shot(trainval[1], k, np.random.default_rng([config.seed, k, s]))]
                     for a in trainval], test, cfg.costs, cfg.folds)[0]
            for s in range(cfg.samples)]
    results[f"voc07_map_k{k}"], results[f"voc07_map_k{k}_std"] = np.mean(maps), np.std(maps)
    logging.info("VOC07 SVMs, %d images a class: mAP %.4f +- %.4f (%d draws).", k,
                 np.mean(maps), np.std(maps), cfg.samples)
  results["voc07_map_full"], costs = svm_map(trainval, test, cfg.costs, cfg.folds)
  logging.info("VOC07 SVMs, all %d trainval images: mAP %.4f (costs %s).", len(trainval[1]),
               results["voc07_map_full"], costs)
  results = {k: float(v) for k, v in results.items()}
  logging.info("VOC07 linear SVMs (PCL's protocol, docs/SCE.md 9):\n%s",
               table(results, cfg.shots))
  return results

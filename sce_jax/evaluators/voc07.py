"""VOC07 low-shot linear SVMs (docs/SCE.md section 9): PCL's `eval_svm_voc.py`.

salesforce/PCL's protocol, which SCE's VOC07 row used: the frozen trunk's features of VOC2007
trainval and test (resize 256, centre crop 224: the evaluation crop of data.image_size),
L2-normalised; per class, one linear SVM (scikit-learn's LinearSVC with PCL's settings) on
+1 / -1 labels, scored on test by average precision; mAP over the 20 classes. Low-shot: K
training images drawn per class (PCL's `convert_low_shot`), several independent draws, mean
and spread. The SVM cost is chosen among eval.voc07.costs by eval.voc07.cost_rule (`COST_RULES`).
Results go to <workdir>/voc07_svm/results.json by rule, and the logged table shows each rule
run on these features.
"""
import contextlib
import json
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
# eval.voc07.cost_rule. "cv" (the default, the sound rule): each class's cost by k-fold
# cross-validation of the average precision on the training images (Goyal et al. 2019's
# benchmark). "best_on_test": PCL's reporting, which produced SCE's row: for each K, the one
# cost (for all classes) whose mean test mAP over the draws is best, chosen on the test set;
# its metrics are named ..._best_on_test.
COST_RULES = ("cv", "best_on_test")


def low_shot(targets, k, rng):
  """Rows of PCL's K-shot training set: for each class in turn, `k` of the images that show
  it drawn at random; an image drawn for two classes is there twice, as in PCL."""
  return np.concatenate([rng.permutation(np.flatnonzero(targets[:, c]))[:k]
                         for c in range(targets.shape[1])])


def normalize(features):
  """PCL's L2 normalisation, x / (||x|| + 1e-5)."""
  return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def _svm(cost):
  """PCL's LinearSVC: C the cost, positives weighted 2, squared hinge, dual, tol 1e-4, 2000
  iterations."""
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                   loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000, random_state=0)


@contextlib.contextmanager
def _quiet():
  """PCL's 2000 iterations are the protocol's budget: no convergence warnings, as PCL."""
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    yield


def svm_aps(train, test, costs):
  """Per class c, the AP on `test` (PCL's all-point interpolated AP) of the decision function of
  an SVM with cost costs[c] fitted on `train` (+1 / -1 labels). train, test: (features, (N, C)
  bool targets)."""
  (x, targets), (x_test, targets_test) = train, test
  with _quiet():
    return np.array([common.average_precision(targets_test[:, c], _svm(cost).fit(
        x, np.where(targets[:, c], 1, -1)).decision_function(x_test))
                     for c, cost in enumerate(costs)])


def cv_costs(train, costs, folds):
  """Each class's cost among `costs`: the best mean `folds`-fold cross-validated average
  precision on `train` (the first of ties)."""
  from sklearn.model_selection import cross_val_score  # pylint: disable=g-import-not-at-top
  x, targets = train
  with _quiet():
    return [costs[int(np.argmax([cross_val_score(
        _svm(cost), x, np.where(targets[:, c], 1, -1), cv=folds,
        scoring="average_precision").mean() for cost in costs]))]
            for c in range(targets.shape[1])]


def svm_map(train, test, costs, folds):
  """(mAP, chosen cost of each class) of the "cv" rule: per class the cost of `cv_costs`,
  refitted on all of `train`, scored on `test`."""
  chosen = cv_costs(train, costs, folds)
  return float(np.mean(svm_aps(train, test, chosen))), chosen


def draw_maps(draws, test, cfg):
  """(the mAP of each training set of `draws`, the costs chosen) by cfg.cost_rule: "cv", per
  draw the costs of each class (`svm_map`); "best_on_test", PCL's `result[k] =
  result_k.max()`: the one cost of cfg.costs, for every class and draw, whose mean test mAP
  over the draws is best (the first of ties)."""
  if cfg.cost_rule == "cv":
    maps, chosen = zip(*(svm_map(d, test, cfg.costs, cfg.folds) for d in draws))
    return list(maps), list(chosen)
  num_classes = test[1].shape[1]
  maps = np.array([[np.mean(svm_aps(d, test, [cost] * num_classes)) for cost in cfg.costs]
                   for d in draws])
  best = int(np.argmax(maps.mean(axis=0)))
  return [float(m) for m in maps[:, best]], cfg.costs[best]


def metric(shot, rule, std=False):
  """A result's name: voc07_map_k<K> (voc07_map_full for all images), _std for the spread over
  the draws, and _best_on_test for that cost rule."""
  return (f"voc07_map_{'full' if shot == 'full' else f'k{shot}'}{'_std' if std else ''}"
          f"{'' if rule == 'cv' else '_' + rule}")


RULE_WORDS = {"cv": "costs cross-validated", "best_on_test": "cost best on test (PCL's rule)"}


def table(record, shots):
  """Markdown: our mAP (mean +- std over the draws), one column per cost rule of `record`
  ({rule: results}), beside SCE's published row (PCL's rule), percent."""
  rules = [rule for rule in COST_RULES if rule in record]
  cell = lambda rule, shot, std: record[rule].get(metric(shot, rule, std))
  rows = ["| images per class | " + " | ".join(f"sce_jax, {RULE_WORDS[r]}" for r in rules) +
          " | SCE, published (PCL's rule) |", "|---" * (len(rules) + 2) + "|"]
  for shot in (*shots, "full"):
    values = [(cell(r, shot, False), cell(r, shot, True)) for r in rules]
    rows.append(f"| {'all' if shot == 'full' else shot} | " + " | ".join(
        "-" if m is None else f"{100 * m:.2f}" + ("" if s is None else f" +- {100 * s:.2f}")
        for m, s in values) + f" | {PUBLISHED.get(shot, '-')} |")
  return "\n".join(rows)


def recorded(config, workdir):
  """The split sizes that eval.voc07.cost_rule's results in <workdir>/voc07_svm/results.json
  were measured on (`evaluators.provenance`)."""
  record = json.loads((epath.Path(workdir) / "voc07_svm" / "results.json").read_text())
  return {"split_sizes": record[config.eval.voc07.cost_rule]["sizes"]}


def evaluate(config, trunk_variables, mesh, splits, workdir):
  """VOC07 SVMs (docs/SCE.md 9) on the frozen trunk's features of TFDS voc/2007, cached in
  <workdir>/voc07_svm/; returns, by `metric`, the mAP and its _std (over eval.voc07.samples
  draws) for each K of eval.voc07.shots, and of all trainval images, in [0, 1], their costs
  chosen by eval.voc07.cost_rule. <workdir>/voc07_svm/results.json keeps them (and the costs)
  by rule. The features are cached by data.image_size. `splits` is not read."""
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
  features = {}
  for split in ("train", "validation", "test"):
    file = outdir / f"features_{split}_{size}px.npz"
    logging.info("VOC07 SVMs: %s the %s features.", "reading" if file.exists() else "extracting",
                 split)
    features[split] = common.cached_features(file, lambda split=split: extract(split))
    common.safe_point(f"saving the VOC07 {split} features to {file}")
  if jax.process_index() > 0:
    return {}
  trainval = [np.concatenate(a) for a in zip(features["train"], features["validation"])]
  trainval[0] = normalize(trainval[0])
  test = normalize(features["test"][0]), features["test"][1]
  rule, results, costs = cfg.cost_rule, {}, {}
  for k in cfg.shots:
    draws = [[a[low_shot(trainval[1], k, np.random.default_rng([config.seed, k, s]))]
              for a in trainval] for s in range(cfg.samples)]
    maps, costs[k] = draw_maps(draws, test, cfg)
    results[metric(k, rule)], results[metric(k, rule, True)] = np.mean(maps), np.std(maps)
    logging.info("VOC07 SVMs, %d images a class: mAP %.4f +- %.4f (%d draws; %s).", k,
                 np.mean(maps), np.std(maps), cfg.samples, RULE_WORDS[rule])
  (results[metric("full", rule)],), costs["full"] = draw_maps([trainval], test, cfg)
  logging.info("VOC07 SVMs, all %d trainval images: mAP %.4f (%s: %s).", len(trainval[1]),
               results[metric("full", rule)], RULE_WORDS[rule], costs["full"])
  results = {k: float(v) for k, v in results.items()}
  path = outdir / "results.json"
  record = json.loads(path.read_text()) if path.exists() else {}
  record[rule] = {**results, "costs": {str(k): v for k, v in costs.items()},
                  "sizes": {"trainval": len(trainval[1]), "test": len(test[1])}}
  path.write_text(json.dumps(record, indent=1))
  logging.info("VOC07 linear SVMs (PCL's protocol, docs/SCE.md 9):\n%s",
               table(record, cfg.shots))
  return results

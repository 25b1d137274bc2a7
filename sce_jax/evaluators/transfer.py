"""Linear transfer to other data sets (docs/SCE.md section 9): ssl-transfer's `linear.py`.

Ericsson et al. 2021 (linusericsson/ssl-transfer), the protocol behind SCE's transfer row: the
frozen trunk's features of each set's train, validation and test images (shorter side resized
to the crop with a bicubic filter, centre crop, no augmentation); an L2-regularised
multinomial logistic regression fitted by L-BFGS (scikit-learn's, warm-started from one fit to
the next) for each weight decay of a logarithmic grid, scored on the validation split; the best
refitted on train + validation and scored on test, by the set's metric (`PROTOCOLS`).

Features are extracted once per set and split, sharded over the mesh, and cached in
<workdir>/transfer/<set>/; <workdir>/transfer/results.json holds the finished sets, so a run
stopped between sets resumes at the next one. A SIGTERM or Ctrl-C stops the run after the split
or set in progress is saved (evaluators.common.safe_point).
"""
import dataclasses
import functools
import json
import warnings

import jax
import numpy as np
from absl import logging
from etils import epath

from sce_jax import models
from sce_jax.data import folders, sources
from sce_jax.data.images import DataError
from sce_jax.evaluators import common

METRICS = {"top1": "top-1", "mean_per_class": "mean per-class", "map11": "11-point mAP"}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How ssl-transfer evaluates a set: its metric, and which TFDS splits (`tfds`) hold the
  train, validation and test images; val '' holds out a seeded eval.transfer.val_fraction of
  train (ssl-transfer's 20 %) for sets without a validation split of their own."""
  metric: str
  tfds: str = ""  # '' (FGVC-Aircraft): only as NAME=PATH, TFDS lacks it
  train: str = "train"
  val: str = ""
  test: str = "test"


# The 11 sets of ssl-transfer's LINEAR_DATASETS by their TFDS names, with its metrics and
# splits: SUN397 and DTD their first partition, Caltech-101 30 training images a class.
PROTOCOLS = {
    "food101": Protocol("top1", "food101", test="validation"),
    "cifar10": Protocol("top1", "cifar10"),
    "cifar100": Protocol("top1", "cifar100"),
    "sun397": Protocol("top1", "sun397/standard-part1-120k"),
    "cars196": Protocol("top1", "cars196"),
    "aircraft": Protocol("mean_per_class"),
    "voc/2007": Protocol("map11", "voc/2007", val="validation"),
    "dtd": Protocol("top1", "dtd", val="validation"),
    "oxford_iiit_pet": Protocol("mean_per_class", "oxford_iiit_pet"),
    "caltech101": Protocol("mean_per_class", "caltech101"),
    "oxford_flowers102": Protocol("mean_per_class", "oxford_flowers102", val="validation"),
}
# eval.transfer.caltech101_split: Caltech-101's train and test images. "ssl_transfer": the split
# of ssl-transfer's create_caltech101_splits, behind SCE's 92.7 (`ssl_transfer_split`: 2,416 /
# 6,728 images); "tfds": TFDS's own (30 a class without replacement: 3,060 / 6,084).
CALTECH101_SPLITS = ("ssl_transfer", "tfds")
# Caltech-101's class folders with capitals, by TFDS's lower-cased label: torchvision's
# ImageFolder, whose order the ssl-transfer split's draws follow, sorts the folders' own names.
CALTECH101_FOLDERS = {n.lower(): n for n in (
    "BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes")}
# SCE's published row (multi-crop ResNet-50; CEA-LIST/SCE README), percent; mean of the 11.
PUBLISHED = {"food101": 77.7, "cifar10": 94.8, "cifar100": 80.4, "sun397": 65.3,
             "cars196": 65.7, "aircraft": 59.6, "voc/2007": 84.0, "dtd": 77.1,
             "oxford_iiit_pet": 90.9, "caltech101": 92.7, "oxford_flowers102": 96.1}
PUBLISHED_MEAN = 80.4


def parse_datasets(spec):
  """eval.transfer.datasets -> [(name, path)]: TFDS names of `PROTOCOLS` (path '') and
  NAME=PATH entries (a class-folder tree or archive; a NAME of `PROTOCOLS` takes its metric).
  ValueError names an entry that is neither."""
  out = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    name, eq, path = item.partition("=")
    if eq and not (name and path):
      raise ValueError(f"eval.transfer.datasets entry {item!r} is not NAME=PATH")
    if eq and PROTOCOLS.get(name, Protocol("")).metric == "map11":
      raise ValueError(f"eval.transfer.datasets: {name} is multi-label and read from TFDS only; "
                       f"write {name} without =PATH")
    if not eq and not PROTOCOLS.get(name, Protocol("")).tfds:
      raise ValueError(
          f"eval.transfer.datasets: {name!r} is not a TFDS set of the protocol "
          f"({', '.join(n for n, p in PROTOCOLS.items() if p.tfds)}); name a local copy as "
          f"{name}=PATH (a class-folder tree or .tar/.tar.gz of one)")
    if name in (n for n, _ in out):
      raise ValueError(f"eval.transfer.datasets names {name!r} twice")
    out.append((name, path))
  if not out:
    raise ValueError("eval.transfer.datasets is empty")
  return out


def protocol(name, path, transfer_cfg):
  """The choices behind a set's number besides its metric, recorded in results.json and the
  table: its train/test split ('folder' for NAME=PATH, Caltech-101's of
  eval.transfer.caltech101_split, else TFDS's) and the C of a fit per weight decay (`c_of`)."""
  split = "folder" if path else ("tfds" if name != "caltech101" else transfer_cfg.caltech101_split)
  binary = PROTOCOLS.get(name, Protocol("top1")).metric == "map11"
  return {"split": split, "C": "2 / weight decay" if binary else "1 / weight decay"}


def c_of(metric, weight_decay):
  """scikit-learn's C for a weight decay: 1 / weight decay, and twice that for VOC2007's binary
  fits. ssl-transfer fits each binary target with LogisticRegression(multi_class=
  'multinomial'): two weight vectors, w1 = -w0 at the L2 optimum, whose penalty
  (|w0|^2 + |w1|^2) / 2 is half the binary fit's |w1 - w0|^2 / 2: the binary fit at 2C
  (scikit-learn >= 1.7 has no multinomial fit of two classes)."""
  return (2.0 if metric == "map11" else 1.0) / weight_decay


def ssl_transfer_split(folders, files, per_class=30, seed=0):
  """(train rows, test rows) of ssl-transfer's `create_caltech101_splits` for images named by
  class folder and file name: in torchvision ImageFolder's order (folders sorted, then files),
  after np.random.seed(seed), each class in turn draws np.random.choice(its images, per_class),
  WITH replacement; train is the images drawn (each once, in that order), test all others.
  Caltech-101: 2,416 / 6,728 (17-30 distinct training images a class), its train.txt."""
  order = np.lexsort((files, folders))  # rows in ImageFolder's order
  labels = np.unique(np.asarray(folders)[order], return_inverse=True)[1]
  rng = np.random.RandomState(seed)  # the legacy generator that np.random.seed seeds
  drawn = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class)
                          for c in range(labels.max() + 1)])
  train = np.unique(drawn)
  return order[train], order[np.setdiff1d(np.arange(len(order)), train)]


def caltech101_ssl_transfer(data_dir):
  """(train, test) sources of TFDS caltech101's images (its train and test together) split by
  `ssl_transfer_split`, labelled by TFDS's classes."""
  builder, examples = sources.tfds_examples("caltech101", "train+test", data_dir)
  names = builder.info.features["label"].names
  labels = np.array([e["label"] for e in examples])
  every = sources.InMemory([e["image"] for e in examples], labels, names)
  train, test = ssl_transfer_split(
      [CALTECH101_FOLDERS.get(names[i], names[i]) for i in labels],
      [e["image/file_name"].decode() for e in examples])
  return sources.subset(every, train), sources.subset(every, test)


def weight_decays(transfer_cfg):
  """The regularisation grid: wd_values weight decays log-spaced over wd_range (ssl-transfer:
  torch.logspace(-6, 5, 45)); scikit-learn's C is 1 / weight decay."""
  lo, hi = transfer_cfg.wd_range
  return np.logspace(np.log10(lo), np.log10(hi), transfer_cfg.wd_values)


def _openers(name, path, config):
  """{split: () -> (source, (N, C) multi-label targets or None)}: train, test, and val where
  the set has its own (a TFDS split of `PROTOCOLS`; beside PATH, a val/validation split);
  Caltech-101's train and test by eval.transfer.caltech101_split."""
  data_cfg = config.data
  if path:
    cfg = common.data_config(data_cfg, source="folder", path=path, eval_path="",
                             train_split="train", eval_split="test", labels="folders")
    train = functools.cache(lambda: sources.SOURCES["folder"](cfg, "train"))
    openers = {"train": lambda: (train(), None),
               "test": lambda: (sources.SOURCES["folder"](cfg, "test", train()), None)}
    val = folders.split_path(path, ("val", "validation"))
    if val is not None:
      val_cfg = common.data_config(cfg, eval_path=str(val))
      openers["val"] = lambda: (sources.SOURCES["folder"](val_cfg, "val", train()), None)
    return openers
  if protocol(name, path, config.eval.transfer)["split"] == "ssl_transfer":
    both = functools.cache(lambda: caltech101_ssl_transfer(data_cfg.data_dir))
    return {"train": lambda: (both()[0], None), "test": lambda: (both()[1], None)}
  spec = PROTOCOLS[name]
  if spec.metric == "map11":
    open_split = lambda split: sources.multi_label_tfds(spec.tfds, split, data_cfg.data_dir)
  else:
    open_split = lambda split: (sources.Tfds(spec.tfds, split, data_cfg.data_dir), None)
  splits = {"train": spec.train, "test": spec.test, "val": spec.val}
  return {k: functools.partial(open_split, split) for k, split in splits.items() if split}


def image_size(config):
  """The crop of the features: eval.transfer.image_size, or the pretraining's (0)."""
  return config.eval.transfer.image_size or config.data.image_size


def _features(name, path, config, trunk, variables, mesh, outdir):
  """{split: (features, targets)} of a set (process 0; None elsewhere), each split extracted
  once into outdir/features_<split>_<s>px.npz (features_<split>_ssl_transfer_<s>px.npz for
  Caltech-101's ssl-transfer split): ssl-transfer's Resize(s, bicubic) + CenterCrop(s), at
  s = `image_size`."""
  size = image_size(config)
  rule = protocol(name, path, config.eval.transfer)["split"]
  tag = "" if rule in ("tfds", "folder") else f"_{rule}"
  data = common.data_config(config.data, image_size=size, eval_resize=size,
                            eval_interpolation="bicubic", cache=False)

  def extract(opener):
    source, multi_label = opener()
    feats, labels = common.extract_features(trunk, variables, source, data,
                                            batch_size=config.eval.batch_size, mesh=mesh)
    return feats, (labels if multi_label is None else multi_label[labels])

  out = {}
  for split, opener in _openers(name, path, config).items():
    file = outdir / f"features_{split}{tag}_{size}px.npz"
    logging.info("Transfer to %s: %s the %s features (%d px).", name,
                 "reading" if file.exists() else "extracting", split, size)
    out[split] = common.cached_features(file, functools.partial(extract, opener))
    common.safe_point(f"saving the {split} features of {name} to {file}")
  return out if jax.process_index() == 0 else None


def holdout(features, targets, fraction, seed):
  """(train, val) of a set without a validation split: a seeded random `fraction` of the
  training rows is held out, as ssl-transfer's `valid_size` (0.2)."""
  order = np.random.default_rng(seed).permutation(len(targets))
  n_val = int(np.floor(fraction * len(targets)))
  return ((features[order[n_val:]], targets[order[n_val:]]),
          (features[order[:n_val]], targets[order[:n_val]]))


def mean_per_class_accuracy(labels, predictions):
  """The mean over the classes present in `labels` of the fraction of their rows predicted
  right (ssl-transfer: the confusion matrix's diagonal over its row sums)."""
  classes = np.unique(labels)
  return float(np.mean([np.mean(predictions[labels == c] == c) for c in classes]))


def logistic_regression(metric, max_iter):
  """fit_score(weight_decay, (x, y) train, (x, y) test) -> the test score of scikit-learn's
  L-BFGS multinomial logistic regression with C = `c_of`(metric, weight_decay) fitted on train.

  One estimator, warm-started from its previous fit, as ssl-transfer's LinearTester; VOC2007's
  20 classes are 20 binary fits scored by 11-point AP on their decision function.
  """
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True)

  def fit_score(weight_decay, train, test):
    (x, y), (x_test, y_test) = train, test
    clf.set_params(C=c_of(metric, weight_decay))
    with warnings.catch_warnings():  # max_iter is the protocol's budget; ssl-transfer too.
      warnings.simplefilter("ignore", ConvergenceWarning)
      if metric == "map11":
        return float(np.mean([common.average_precision(
            y_test[:, c], clf.fit(x, y[:, c]).decision_function(x_test), eleven_point=True)
                              for c in range(y.shape[1])]))
      predictions = clf.fit(x, y).predict(x_test)
    if metric == "mean_per_class":
      return mean_per_class_accuracy(y_test, predictions)
    return float(np.mean(predictions == y_test))
  return fit_score


def select_and_test(sets, grid, fit_score):
  """ssl-transfer's validate-then-evaluate: each weight decay of `grid`, in order, fitted on
  sets['train'] and scored on sets['val']; the first best (a strictly higher score replaces
  it) refitted on sets['trainval'] and scored on sets['test']. Returns (test score, weight
  decay, its validation score)."""
  best, best_score = None, -np.inf
  for weight_decay in grid:
    score = fit_score(weight_decay, sets["train"], sets["val"])
    if score > best_score:
      best, best_score = weight_decay, score
  return fit_score(best, sets["trainval"], sets["test"]), float(best), best_score


def _solve(name, path, features, config):
  """The protocol on one set's features: its results.json entry."""
  cfg = config.eval.transfer
  metric = PROTOCOLS.get(name, Protocol("top1")).metric
  sets = dict(features)
  if "val" in sets:
    sets["trainval"] = tuple(np.concatenate(a) for a in zip(sets["train"], sets["val"]))
  else:
    sets["trainval"] = sets["train"]
    sets["train"], sets["val"] = holdout(*sets["train"], cfg.val_fraction, config.seed)
  value, weight_decay, val_value = select_and_test(
      sets, weight_decays(cfg), logistic_regression(metric, cfg.max_iter))
  return {"metric": metric, "value": value, "weight_decay": weight_decay,
          "C": c_of(metric, weight_decay), "val_value": val_value,
          "image_size": image_size(config), "sizes": {k: len(v[1]) for k, v in sets.items()},
          "protocol": protocol(name, path, cfg)}


def protocol_words(entry):
  """A results.json entry's `protocol`, as the table's protocol column says it."""
  split = {"ssl_transfer": "ssl-transfer's split", "tfds": "TFDS split",
           "folder": "folders"}[entry["protocol"]["split"]]
  return split + (", C x 2" if entry["protocol"]["C"].startswith("2") else "")


def table(results, names):
  """Markdown: our value of each set beside SCE's published one (percent), and their means."""
  rows = ["| data set | metric | protocol | sce_jax | SCE, published |", "|---|---|---|---|---|"]
  for name in names:
    r = results[name]
    published = PUBLISHED.get(name)
    rows.append(f"| {name} | {METRICS[r['metric']]} | {protocol_words(r)} | "
                f"{100 * r['value']:.1f} | {'-' if published is None else published} |")
  ours = np.mean([results[n]["value"] for n in names]) * 100
  rows.append(f"| mean | | | {ours:.1f} ({len(names)} sets) | {PUBLISHED_MEAN} (11 sets) |")
  return "\n".join(rows)


def recorded(config, workdir):
  """Of each set of eval.transfer.datasets in <workdir>/transfer/results.json: its split sizes
  and `protocol` (`evaluators.provenance`)."""
  record = json.loads((epath.Path(workdir) / "transfer" / "results.json").read_text())
  names = [name for name, _ in parse_datasets(config.eval.transfer.datasets)]
  return {"split_sizes": {n: record[n]["sizes"] for n in names},
          "protocol": {"sets": {n: record[n]["protocol"] for n in names}}}


def evaluate(config, trunk_variables, mesh, splits, workdir):
  """Linear transfer (docs/SCE.md 9) of the frozen trunk to each set of
  eval.transfer.datasets; returns {'transfer_<set>': value, 'transfer_mean': mean}, values in
  [0, 1]. `splits` (the pretraining data) is not read. Writes <workdir>/transfer/results.json
  after each set and logs the table beside the published row; a set already in results.json
  with the same `protocol` (a run stopped between sets) is not evaluated again: delete its
  entry to evaluate it with other solver settings (its features, cached by image size, are
  read back)."""
  del splits
  common.import_sklearn()
  datasets = parse_datasets(config.eval.transfer.datasets)
  for name, path in datasets:  # Before any set is extracted; the folder source names data.path.
    if path and not epath.Path(path).exists():
      raise DataError(f"eval.transfer.datasets: {name}={path} does not exist; set "
                      "--config.eval.transfer.datasets to NAME=PATH entries of class-folder "
                      "trees or .tar/.tar.gz archives of them (or TFDS names).")
  outdir = epath.Path(workdir) / "transfer"
  common.pin_trunk(outdir, trunk_variables, "transfer features")
  record = outdir / "results.json"
  results = json.loads(record.read_text()) if record.exists() else {}
  trunk = models.make_trunk(config.model)
  for i, (name, path) in enumerate(datasets, 1):
    done = results.get(name, {}).get("protocol") == protocol(name, path, config.eval.transfer)
    if common.decided_by_process_0(done):
      logging.info("Transfer to %s: done before (%s).", name, record)
      continue
    features = _features(name, path, config, trunk, trunk_variables, mesh,
                         outdir / name.replace("/", "_"))
    if jax.process_index() == 0:
      logging.info("Transfer to %s: fitting %d weight decays.", name,
                   config.eval.transfer.wd_values)
      results[name] = _solve(name, path, features, config)
      logging.info("Transfer to %s (set %d of %d): %s %.4f (weight decay %.3g).", name, i,
                   len(datasets), METRICS[results[name]["metric"]], results[name]["value"],
                   results[name]["weight_decay"])
      tmp = outdir / ".results.json.tmp"
      tmp.write_text(json.dumps(results, indent=1))
      tmp.replace(record)
    if i < len(datasets):
      common.safe_point(f"transfer to {name}, recorded in {record}")
  if jax.process_index() > 0:
    return {}
  names = [name for name, _ in datasets]
  logging.info("Linear transfer (ssl-transfer's protocol, docs/SCE.md 9):\n%s",
               table(results, names))
  out = {f"transfer_{name}": results[name]["value"] for name in names}
  out["transfer_mean"] = float(np.mean(list(out.values())))
  return out

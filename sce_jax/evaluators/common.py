"""What the evaluators of a trunk share (docs/SCE.md sections 7, 9): its features (cached in the
workdir), top-k and average precision, the trunk a run is pinned to, scikit-learn.

Everything runs sharded over the `data` mesh: batches are split over devices, the trunk is
replicated and always in inference mode (BatchNorm running statistics). Trunk variables are
{'params': ..., 'batch_stats': ...} of the online trunk alone (a ViT's batch_stats are {}):
`trunk_variables(state)` during training, `weights.load_trunk` for a checkpoint or imported
weights.
"""
import functools
import hashlib
import importlib.metadata
import io
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from sce_jax import checkpoint, preemption, sharding
from sce_jax.data import augment, pipeline


class MissingPackage(ImportError):
  """An optional package an evaluator needs; the message names the extra that installs it."""


def import_sklearn():
  """Checks, before any feature is extracted, that scikit-learn (the protocols' own solvers,
  the `eval` extra) imports; the evaluators import its modules where they use them."""
  try:
    import sklearn  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingPackage("this evaluation needs scikit-learn: pip install 'sce_jax[eval]' (or "
                         "scikit-learn).") from e
  return sklearn


def trunk_variables(state):
  """The online trunk's variables of a TrainState (what evaluation reads)."""
  return {"params": state.params["trunk"], "batch_stats": state.batch_stats.get("trunk", {})}


@functools.partial(jax.jit, static_argnames=("trunk", "mean", "std"))
def _features(variables, images, *, trunk, mean, std):
  """The trunk's float32 features of uint8 images, in inference mode. Module-level, so that
  the kNN monitoring of a run compiles it once, not at every evaluation and split."""
  x = augment.normalize(images.astype(jnp.float32) / 255.0, mean, std)
  return trunk.apply(variables, x, train=False).astype(jnp.float32)


def extract_features(trunk, variables, source, data_cfg, *, batch_size, mesh):
  """Raw trunk features and labels of every example of `source`, each exactly once.

  Returns (features (N, D) float32, labels (N,) int32) as host arrays, in the iterator's order;
  padding rows of the last batch (mask False) are dropped. Host arrays, because a train set's
  features (ImageNet: 1.28M x 2048) need not fit on one device; knn_scores shards them back.
  """
  forward = functools.partial(_features, trunk=trunk, mean=tuple(data_cfg.mean),
                              std=tuple(data_cfg.std))
  variables = jax.device_put(variables, sharding.replicated(mesh))
  outputs = [(forward(variables, b["image"]), b["label"], b["mask"])
             for b in pipeline.eval_iterator(source, data_cfg, global_batch_size=batch_size,
                                             sharding=sharding.rows(mesh))]
  feats, labels, mask = (np.concatenate([sharding.to_host(o[i]) for o in outputs])
                         for i in range(3))
  return feats[mask], labels[mask].astype(np.int32)


def data_config(data_cfg, **changes):
  """A copy of data config `data_cfg` with `changes`: the evaluations that read other sets, or
  at another resolution, than the pretraining's (docs/SCE.md 9)."""
  out = data_cfg.copy_and_resolve_references()
  out.update(changes)
  return out


def decided_by_process_0(flag: bool) -> bool:
  """Process 0's `flag` on every process, so that all take the same collective path."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def safe_point(what=None, where=None):
  """Where an evaluation may stop at a SIGTERM or Ctrl-C (preemption.py), as process 0 decides:
  preemption.Preempted after `what` was saved (a rerun resumes after it), else
  preemption.Stopped (nothing saved; `where` says where it stopped)."""
  if decided_by_process_0(preemption.requested()):
    if what is None:
      raise preemption.stopped(where)
    raise preemption.kept(what)


def cached_features(path, extract):
  """(features, targets) of one split, computed once per workdir (docs/SCE.md 9).

  extract() -> (features, targets) runs on every process (the sharded forward pass is
  collective) unless process 0 finds them in `path` (.npz); process 0 writes them there as a
  temporary file renamed into place, so a file that exists is whole. A rerun, another solver
  setting or a run resumed after an interruption costs no second forward pass. Only process 0
  solves and reports: it gets the arrays, the other processes None.
  """
  path = epath.Path(path)
  if decided_by_process_0(jax.process_index() == 0 and path.exists()):
    if jax.process_index() > 0:
      return None
    with path.open("rb") as f:
      arrays = np.load(io.BytesIO(f.read()))
      return arrays["features"], arrays["targets"]
  features, targets = extract()
  if jax.process_index() > 0:
    return None
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  with tmp.open("wb") as f:
    np.savez(f, features=features, targets=targets)
  tmp.replace(path)
  return features, targets


def pin_trunk(rundir, trunk_variables, what):
  """Pins run directory `rundir` to the trunk weights it started with, so that an evaluation
  resumes only on them: <rundir>/trunk_checksums.json names them (checkpoint.checksums). Evaluating other weights (the workdir's pretraining went
  on) needs the old run, `what`, out of the way."""
  rundir = epath.Path(rundir)
  digests = checkpoint.checksums(trunk_variables)
  record = rundir / "trunk_checksums.json"
  if record.exists() and json.loads(record.read_text()) != digests:
    raise checkpoint.CheckpointError(
        f"{rundir} holds {what} of other trunk weights; delete it (or pass another --workdir) "
        "to evaluate these.")
  if jax.process_index() == 0:
    rundir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(digests))


def trunk_checksum(trunk_variables) -> str:
  """One SHA-256 (16 hex digits) of the trunk's weights: of its arrays' `checkpoint.checksums`
  (what trunk_checksums.json lists), so that a number names the weights it was measured on."""
  digests = json.dumps(checkpoint.checksums(trunk_variables), sort_keys=True)
  return hashlib.sha256(digests.encode()).hexdigest()[:16]


# The packages whose versions a result records (those absent are left out).
PACKAGES = ("sce_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "scikit-learn", "scipy", "tensorflow-datasets", "tensorflow", "grain")


def versions() -> dict[str, str]:
  """{package: version} of Python and the installed `PACKAGES`."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def average_precision(positives, scores, eleven_point=False):
  """Average precision of one class from its scores (docs/SCE.md 9), on scikit-learn's
  precision-recall curve (which starts at precision 1, recall 0).

  eleven_point: the mean over t = 0, 0.1, ..., 1 of the best precision at recall >= t, the
  VOC2007 metric as ssl-transfer computes it; else the area under the curve whose precision
  is made non-increasing (the best at any larger recall), as PCL's `calculate_ap`.
  """
  from sklearn.metrics import precision_recall_curve  # pylint: disable=g-import-not-at-top
  precision, recall, _ = precision_recall_curve(positives, scores)
  precision, recall = precision[::-1], recall[::-1]  # recall ascending, from the (0, 1) point
  if eleven_point:
    return float(np.mean([precision[recall >= t].max() for t in np.linspace(0, 1, 11)]))
  envelope = np.maximum.accumulate(precision[::-1])[::-1]
  return float(np.sum(np.diff(recall) * envelope[1:]))


def topk_accuracy(scores, labels, ks=(1, 5)):
  """Fraction of rows whose label is among the k highest scores, for each k (capped at C)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = order == np.asarray(labels)[:, None]
  return [float(hits[:, :k].any(axis=1).mean()) for k in ks]

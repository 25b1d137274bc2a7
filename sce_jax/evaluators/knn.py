"""Weighted kNN on the frozen trunk's features (docs/SCE.md section 7), sharded over the mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sce_jax import losses, models, sharding
from sce_jax.evaluators import common
from sce_jax.sharding import DATA


def _nearest(train_feats, train_labels, test_feats, k):
  """Similarities and labels of the k most similar train rows; rows labelled -1 are padding."""
  sims = test_feats @ train_feats.T
  sims = jnp.where(train_labels[None, :] >= 0, sims, -jnp.inf)
  sims, idx = jax.lax.top_k(sims, k)
  return sims, train_labels[idx]


def _vote(sims, labels, temp, num_classes):
  """InstDisc / lightly weighted vote: each neighbour adds exp(sim / T) to its class."""
  weights = jnp.exp(sims / temp)
  return jnp.einsum("nk,nkc->nc", weights, jax.nn.one_hot(labels, num_classes))


def knn_predict(train_feats, train_labels, test_feats, k, temp, num_classes):
  """Class scores (M, num_classes) of weighted kNN on L2-normalised features (docs/SCE.md 7)."""
  sims, labels = _nearest(train_feats, train_labels, test_feats, k)
  return _vote(sims, labels, temp, num_classes)


def knn_scores(train_feats, train_labels, test_feats, *, k, temp, num_classes, mesh, chunk):
  """knn_predict on the accelerator for any number of rows (ImageNet's does not fit at once).

  The train set is sharded over the mesh (padded with label -1), test rows go in chunks of
  `chunk`, replicated: each device takes the top k of its shard, the k best of all devices'
  candidates are then exactly the global top k. Features are L2-normalised here.
  Returns host scores (M, num_classes).
  """
  n_dev = mesh.devices.size
  n = train_feats.shape[0]
  pad = -n % n_dev
  train_feats = np.pad(train_feats, ((0, pad), (0, 0)))
  train_labels = np.pad(train_labels, (0, pad), constant_values=-1)
  k = min(k, n)
  fn = _knn_fn(mesh, min(k, train_feats.shape[0] // n_dev), k, temp, num_classes)
  rows, replicated = sharding.rows(mesh), sharding.replicated(mesh)
  train_feats, train_labels = sharding.put(train_feats, rows), sharding.put(train_labels, rows)
  m = test_feats.shape[0]
  test_feats = np.pad(test_feats, ((0, -m % chunk), (0, 0)))
  scores = [np.asarray(fn(train_feats, train_labels,
                          sharding.put(test_feats[i:i + chunk], replicated)))
            for i in range(0, m, chunk)]
  return np.concatenate(scores)[:m]


@functools.lru_cache(maxsize=8)
def _knn_fn(mesh, k_local, k, temp, num_classes):
  """knn_scores' jitted program for these settings, built once (not at every evaluation)."""

  def local(train_feats, train_labels, test_feats):
    unit = losses.l2_normalize
    sims, labels = _nearest(unit(train_feats), train_labels, unit(test_feats), k_local)
    sims = jax.lax.all_gather(sims, DATA, axis=1, tiled=True)
    labels = jax.lax.all_gather(labels, DATA, axis=1, tiled=True)
    sims, idx = jax.lax.top_k(sims, k)
    return _vote(sims, jnp.take_along_axis(labels, idx, axis=1), temp, num_classes)

  # After the all_gather every device holds the same scores; check_vma cannot tell.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P(DATA), P()),
                               out_specs=P(), check_vma=False))


def evaluate(config, trunk_variables, mesh, splits, workdir=None):
  """Weighted kNN top-1/top-5 (k=config.eval.knn.k, T=config.eval.knn.temp; docs/SCE.md 7) of
  the `splits.eval` images against the `splits.train` images (`sources.Splits`); workdir:
  unused (kNN writes nothing)."""
  trunk = models.make_trunk(config.model)
  extract = lambda source: common.extract_features(
      trunk, trunk_variables, source, config.data, batch_size=config.eval.batch_size, mesh=mesh)
  train_feats, train_labels = extract(splits.train)
  common.safe_point(where="during the kNN evaluation")
  test_feats, test_labels = extract(splits.eval)
  scores = knn_scores(train_feats, train_labels, test_feats, k=config.eval.knn.k,
                      temp=config.eval.knn.temp, num_classes=splits.num_classes,
                      mesh=mesh, chunk=config.eval.batch_size)
  top1, top5 = common.topk_accuracy(scores, test_labels)
  return {"knn_top1": top1, "knn_top5": top5}

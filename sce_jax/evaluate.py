"""Evaluation of a frozen trunk (docs/SCE.md section 7): its weights, its features, kNN.

Everything runs sharded over the `data` mesh: batches are split over devices, the trunk is
replicated and always in inference mode (BatchNorm running statistics). Trunk variables are
{'params': ..., 'batch_stats': ...} of the online trunk alone: `trunk_variables(state)` during
training, `load_trunk` for a checkpoint or imported weights. The linear probe is in linear.py.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sce_jax import convert, losses, models, sharding
from sce_jax.data import augment, pipeline
from sce_jax.sharding import DATA


def trunk_variables(state):
  """The online trunk's variables of a TrainState (what evaluation reads)."""
  return {"params": state.params["trunk"], "batch_stats": state.batch_stats["trunk"]}


def load_trunk(path, model_cfg, which="online", allow_pickle=False) -> dict[str, Any]:
  """A validated trunk for `models.make_trunk(model_cfg)`: {'params', 'batch_stats'} (numpy).

  path: an sce_jax workdir or checkpoint dir (orbax), an sce_jax .safetensors, or a
  torchvision / authors' .safetensors, .pth, .pt or .ckpt (the last three need torch).
  which: 'online' or 'target' (the authors' `momentum_trunk`).
  allow_pickle: let torch.load unpickle arbitrary objects (Lightning .ckpt); trusted files only.
  """
  params_c, stats_c = convert.NETS[which]
  variables, layout = convert.read(path, allow_pickle, only=(which, "trunk"))
  if "trunk" not in variables.get(params_c, {}):
    raise ValueError(f"{path} has no {which} trunk; it holds {convert.describe(variables)}.")
  convert.check_variables(variables, model_cfg, [(which, "trunk")], source=str(path),
                          layout=layout)
  return {"params": variables[params_c]["trunk"],
          "batch_stats": variables.get(stats_c, {}).get("trunk", {})}


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


def topk_accuracy(scores, labels, ks=(1, 5)):
  """Fraction of rows whose label is among the k highest scores, for each k (capped at C)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = order == np.asarray(labels)[:, None]
  return [float(hits[:, :k].any(axis=1).mean()) for k in ks]


def knn_eval(config, trunk_variables, mesh, splits):
  """Weighted kNN top-1/top-5 (k=config.eval.knn_k, T=config.eval.knn_temp; docs/SCE.md 7) of the
  `splits.eval` images against the `splits.train` images (`sources.Splits`)."""
  trunk = models.make_trunk(config.model)
  extract = lambda source: extract_features(trunk, trunk_variables, source, config.data,
                                            batch_size=config.eval.batch_size, mesh=mesh)
  train_feats, train_labels = extract(splits.train)
  test_feats, test_labels = extract(splits.eval)
  scores = knn_scores(train_feats, train_labels, test_feats, k=config.eval.knn_k,
                      temp=config.eval.knn_temp, num_classes=splits.num_classes,
                      mesh=mesh, chunk=config.eval.batch_size)
  top1, top5 = topk_accuracy(scores, test_labels)
  return {"knn_top1": top1, "knn_top5": top5}

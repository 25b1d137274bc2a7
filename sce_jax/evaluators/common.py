"""What every evaluator of a frozen trunk shares (docs/SCE.md section 7): its features, top-k.

Everything runs sharded over the `data` mesh: batches are split over devices, the trunk is
replicated and always in inference mode (BatchNorm running statistics). Trunk variables are
{'params': ..., 'batch_stats': ...} of the online trunk alone (a ViT's batch_stats are {}):
`trunk_variables(state)` during training, `weights.load_trunk` for a checkpoint or imported
weights.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sce_jax import sharding
from sce_jax.data import augment, pipeline


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


def topk_accuracy(scores, labels, ks=(1, 5)):
  """Fraction of rows whose label is among the k highest scores, for each k (capped at C)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = order == np.asarray(labels)[:, None]
  return [float(hits[:, :k].any(axis=1).mean()) for k in ks]

"""SCE (Denize et al., WACV 2023; docs/SCE.md 1-5): the method sce_jax reproduces.

EMA target (trunk + projector), FIFO queue of target embeddings (and/or the global batch's
keys as negatives, `sce.negatives`), the loss of `losses.sce_terms` averaged over the crop
pairs of `losses.crop_pairs`. Its recipes are the config files' own values (docs/SCE.md 5, 10),
so the setting's entries are empty.
"""
import jax.numpy as jnp

from sce_jax import losses

EMA_TARGET = True
RECIPES = {"cifar": {}, "imagenet": {}, "cifar_vit": {}, "imagenet_vit": {}}


pairs = losses.config_pairs  # the crop pairing the config states


def uses_queue(config):
  return losses.uses_queue(config.sce.negatives)


def make_loss(config, pairs):
  """The pair-averaged SCE loss of this device's rows, with in-batch negatives (`sce.negatives`
  batch or both: the whole global batch's target keys of the view, `keys`). Metrics: the
  online-target cosine of the positives and the target distribution's entropy."""
  sce_cfg = config.sce
  use_batch = losses.uses_batch(sce_cfg.negatives)
  kw = dict(temp=sce_cfg.temp, temp_m=sce_cfg.temp_m, coeff=sce_cfg.coeff,
            positive=sce_cfg.positive)

  def local(qs, zs, queue, keys):
    total, pos_sim, entropy = 0.0, 0.0, 0.0
    for i, j in pairs:
      q, z = qs[j], zs[i]
      neg = dict(batch_keys=keys.embeddings[i], batch_index=keys.index) if use_batch else {}
      loss, w = losses.sce_terms(q, z, queue, **kw, **neg)
      total += jnp.mean(loss)
      pos_sim += jnp.mean(jnp.sum(q * z, axis=-1))
      entropy += jnp.mean(-jnp.sum(jnp.where(w > 0, w * jnp.log(w), 0.0), axis=-1))
    n = len(pairs)
    return total / n, {"pos_sim": pos_sim / n, "target_entropy": entropy / n}

  return local

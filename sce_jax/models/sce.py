"""The SCE network: trunk -> projector -> predictor, plus the online linear probe.

The trunk is one of a family's (a ResNet, a ViT: docs/SCE.md 4, 10), built by
`trunks.make_trunk` from config.model.trunk.

The online network has all four parts; the target (EMA) network is the same module built with
`with_predictor=False, num_classes=0`, so its parameters are the online `trunk` and `projector`
subtrees (docs/SCE.md section 3: same trunk + projector, no predictor); with shuffle-BN
(`trunk_bn_splits`) its trunk's BatchNorms normalise groups of the batch, with the same
variables.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sce_jax.models import heads, inits, trunks

# model.dtype: the computation's; parameters stay float32.
DTYPES = ("float32", "bfloat16", "float16")


class SCENet(nn.Module):
  model: Any            # config.model (trunk, width, small_stem, projector, predictor, dtype)
  with_predictor: bool = True
  num_classes: int = 0  # > 0 adds the online linear probe on stop-gradient features.
  trunk_bn_splits: int = 0  # > 0: the trunk's BatchNorms split the batch (shuffle-BN target).

  def setup(self):
    cfg = self.model
    dtype = jnp.dtype(cfg.dtype)
    self.trunk = trunks.make_trunk(cfg, self.trunk_bn_splits)
    f32_grads = cfg.get("f32_weight_grads", True)
    self.projector = heads.make(cfg.projector, dtype=dtype, f32_weight_grads=f32_grads)
    if self.with_predictor and cfg.predictor.num_layers > 0:
      self.predictor = heads.MLP(**cfg.predictor, dtype=dtype, f32_weight_grads=f32_grads)
    if self.num_classes:
      self.probe = nn.Dense(self.num_classes, kernel_init=inits.linear_probe,
                            name="probe")

  def __call__(self, x, train: bool = True, bn_positions=None):
    """Returns dict(feat, proj, pred[, logits]); pred is proj when there is no predictor.
    bn_positions: (N,) the rows' order for the trunk's split BatchNorm groups (shuffle-BN, a
    ResNet's; a ViT has no BatchNorm)."""
    feat = (self.trunk(x, train) if bn_positions is None
            else self.trunk(x, train, positions=bn_positions))
    out = {"feat": feat, "proj": self.projector(feat, train)}
    out["pred"] = (self.predictor(out["proj"], train)
                   if hasattr(self, "predictor") else out["proj"])
    if self.num_classes:
      out["logits"] = self.probe(jax.lax.stop_gradient(feat).astype(jnp.float32))
    return out


def make_models(config, num_classes, ema_target=True):
  """Online network (with predictor and probe) and target network (trunk + projector, its
  trunk's BatchNorm split into sce.target_bn_splits groups for shuffle-BN, docs/SCE.md 3; no
  stochastic depth unless sce.target_drop_path), or None for a method without EMA target
  (`methods`' EMA_TARGET)."""
  probe_classes = num_classes if config.probe.enabled else 0
  online = SCENet(config.model, with_predictor=True, num_classes=probe_classes)
  if not ema_target:
    return online, None
  target_model = config.model
  if not config.sce.target_drop_path:  # DINO's teacher: built with drop_path_rate 0
    target_model = ml_collections.ConfigDict(config.model.to_dict())
    target_model.drop_path = 0.0
  return online, SCENet(target_model, with_predictor=False, num_classes=0,
                        trunk_bn_splits=config.sce.target_bn_splits)

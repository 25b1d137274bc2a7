"""The SCE network: trunk -> projector -> predictor, plus the online linear probe.

The trunk is a ResNet (`resnet.ARCHS`) or a ViT (`vit.ARCHS`, docs/SCE.md 10), chosen by
config.model.trunk in `make_trunk`.

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

from sce_jax.models import heads, inits, resnet, vit

# model.dtype: the computation's; parameters stay float32.
DTYPES = ("float32", "bfloat16", "float16")
# model.trunk values.
TRUNKS = (*resnet.ARCHS, *vit.ARCHS)


def is_vit(model_cfg) -> bool:
  return model_cfg.trunk in vit.ARCHS


def make_trunk(model_cfg, bn_splits=0) -> nn.Module:
  """The trunk of config.model; SCENet and the evaluation build it here, so that a
  TrainState's trunk variables fit both. bn_splits > 0: BatchNorm statistics of that many
  groups of the batch (`resnet.SplitBatchNorm`), the same variables (ResNets only)."""
  dtype = jnp.dtype(model_cfg.dtype)
  if is_vit(model_cfg):
    return vit.vit(model_cfg.trunk, width=model_cfg.width, depth=model_cfg.depth,
                   num_heads=model_cfg.num_heads, patch_size=model_cfg.patch_size,
                   pos_embed=model_cfg.pos_embed, pool=model_cfg.pool,
                   drop_path=model_cfg.drop_path, dtype=dtype,
                   f32_weight_grads=model_cfg.get("f32_weight_grads", True))
  return resnet.resnet(model_cfg.trunk, width=model_cfg.width or resnet.WIDTH,
                       small_stem=model_cfg.small_stem, dtype=dtype, bn_splits=bn_splits,
                       f32_weight_grads=model_cfg.get("f32_weight_grads", True))


def feature_dim(model_cfg) -> int:
  """The width of the trunk's features (what evaluation and the probe read)."""
  if is_vit(model_cfg):
    return vit.dims(model_cfg.trunk, model_cfg.width)[0]
  return resnet.feature_dim(model_cfg.trunk, model_cfg.width or resnet.WIDTH)


class SCENet(nn.Module):
  model: Any            # config.model (trunk, width, small_stem, projector, predictor, dtype)
  with_predictor: bool = True
  num_classes: int = 0  # > 0 adds the online linear probe on stop-gradient features.
  trunk_bn_splits: int = 0  # > 0: the trunk's BatchNorms split the batch (shuffle-BN target).

  def setup(self):
    cfg = self.model
    dtype = jnp.dtype(cfg.dtype)
    self.trunk = make_trunk(cfg, self.trunk_bn_splits)
    f32_grads = cfg.get("f32_weight_grads", True)
    self.projector = heads.MLP(**cfg.projector, dtype=dtype, f32_weight_grads=f32_grads)
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
  trunk's BatchNorm split into sce.target_bn_splits groups for shuffle-BN, docs/SCE.md 3), or
  None for a method without EMA target (`methods`' EMA_TARGET)."""
  probe_classes = num_classes if config.probe.enabled else 0
  online = SCENet(config.model, with_predictor=True, num_classes=probe_classes)
  if not ema_target:
    return online, None
  return online, SCENet(config.model, with_predictor=False, num_classes=0,
                        trunk_bn_splits=config.sce.target_bn_splits)

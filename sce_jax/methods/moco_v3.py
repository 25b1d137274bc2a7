"""MoCo v3 (Chen, Xie and He, ICCV 2021): no queue; the online predictor's query of one view
against the EMA target's keys of the other view over the whole global batch (in-batch
negatives), both directions, each cross-entropy x 2 temp (docs/SCE.md 12).

ImageNet: facebookresearch/moco-v3 (main_moco.py defaults, CONFIG.md's ResNet-50 and ViT
commands, moco/builder.py's heads); CIFAR: solo-learn's mocov3.yaml. The target is a copy of
the online trunk + projector at the start (builder.py), then an EMA of it.
"""
import jax
import jax.numpy as jnp

from sce_jax import losses
from sce_jax.sharding import DATA

EMA_TARGET = True

# moco/builder.py _build_mlp: Linear without bias, then BN and ReLU after each hidden layer;
# the last layer followed by BN without affine (last_bn) except in the ResNet's predictor.
# MoCo_ResNet: projector 2 layers, predictor 2 layers without the last BN; MoCo_ViT: projector
# 3 layers, predictor 2 layers with it. main_moco.py: --moco-mlp-dim 4096, --moco-dim 256.
# Both directions (forward: ctr(q1, k2) + ctr(q2, k1)), a BN batch per view (a forward pass
# each), synchronised BN over the global batch (convert_sync_batchnorm): no shuffle-BN.
# --moco-m 0.99 with --moco-m-cos (every CONFIG.md command): a cosine to 1.
_MLP = dict(hidden_dim=4096, norm="batch", activation="relu", last_bias=False)
_COMMON = {
    **{f"model.projector.{k}": v for k, v in _MLP.items()},
    **{f"model.predictor.{k}": v for k, v in _MLP.items()},
    "model.projector.out_dim": 256, "model.projector.last_bn": True,
    "model.predictor.num_layers": 2, "model.concat_views": False,
    "sce.symmetric": True, "sce.num_global": 2, "sce.target_bn_splits": 0,
    "sce.target_init": "copy", "sce.m0": 0.99, "sce.m_schedule": "cosine", "sce.m_final": 1.0}
_RESNET = {**_COMMON, "model.projector.num_layers": 2, "model.predictor.last_bn": False}
# The ViT: MoCo_ViT's heads; vits.py's fixed 2-D sin-cos position table, --stop-grad-conv1
# (the frozen random patch projection), timm's defaults of no stochastic depth; --moco-t=.2;
# AdamW (torch's betas and eps) without gradient clipping.
_VIT = {**_COMMON, "model.projector.num_layers": 3, "model.predictor.last_bn": True,
        "model.pos_embed": "sincos", "model.freeze_patch_embed": True,
        "model.drop_path": 0.0, "sce.temp": 0.2, "optim.name": "adamw",
        "optim.betas": (0.9, 0.999), "optim.eps": 1e-8, "optim.clip_norm": 0.0}
# CONFIG.md's ResNet-50 commands by epochs -> (--lr, --wd, --moco-m); other epoch counts take
# the next published count's values (200 -> 300's).
PRESETS = {100: (0.6, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.3, 1.5e-6, 0.996)}


def _imagenet(c):
  """main_moco.py: batch 4096, LARS (momentum 0.9, trust 1e-3, no decay or trust ratio on
  tensors of ndim <= 1: moco/optimizer.py), lr x batch / 256, 10 warm-up epochs then a cosine,
  --moco-t 1.0, torchvision's ResNet with zero_init_residual=True; CONFIG.md's ResNet-50
  commands add --crop-min=.2 (the `moco_v3` views)."""
  lr, wd, m0 = PRESETS[min((e for e in PRESETS if e >= c.epochs), default=1000)]
  return {**_RESNET, "batch_size": 4096, "optim.name": "lars", "optim.base_lr": lr,
          "optim.weight_decay": wd, "optim.momentum": 0.9, "optim.trust_coefficient": 1e-3,
          "optim.warmup_epochs": 10, "sce.temp": 1.0, "sce.m0": m0, "data.views": "moco_v3",
          "model.zero_init_residual": True}


RECIPES = {
    "imagenet": _imagenet,
    # CONFIG.md's ViT-S and ViT-B commands (batch 4096: main_moco.py's default, 300 epochs):
    # --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --warmup-epochs=40 --stop-grad-conv1
    # --moco-m-cos --moco-t=.2; the default --crop-min 0.08 (the `byol` views); vits.py's
    # vit_small and vit_base have 12 heads.
    "imagenet_vit": {
        **_VIT, "batch_size": 4096, "optim.base_lr": 1.5e-4, "optim.weight_decay": 0.1,
        "optim.warmup_epochs": 40, "model.num_heads": 12, "data.views": "byol"},
    # solo-learn scripts/pretrain/cifar/mocov3.yaml (ResNet-18): the ResNet heads (4096-256),
    # temp 0.2, tau 0.99 -> 1, LARS lr 0.3, wd 1e-6, eta 0.02, exclude_bias_n_norm (its
    # clip_lr is not ours), batch 256; warmup 10 epochs (solo/methods/base.py); views
    # asymmetric.yaml (`cifar_byol`); its ResNet-18 keeps torchvision's zero_init_residual
    # False (backbone.kwargs {}).
    "cifar": {
        **_RESNET, "batch_size": 256, "optim.name": "lars", "optim.base_lr": 0.3,
        "optim.weight_decay": 1e-6, "optim.momentum": 0.9, "optim.trust_coefficient": 0.02,
        "optim.warmup_epochs": 10, "sce.temp": 0.2, "data.views": "cifar_byol"},
    # Ours (no published MoCo v3 ViT recipe on CIFAR): MoCo v3's ViT method (_VIT: heads,
    # temp 0.2, momentum, fixed positions, frozen patch projection, no drop path or clipping)
    # with solo-learn's CIFAR views, and the file's ViT-Tiny, batch 256 and AdamW lr 5e-4 /
    # wd 0.05 / 10 warm-up epochs (eztorch's ViT-Tiny values; MoCo v3's 1.5e-4 / 0.1 / 40
    # are for batch 4096 and 300 ImageNet epochs).
    "cifar_vit": {**_VIT, "data.views": "cifar_byol"},
}


pairs = losses.config_pairs  # the crop pairing the config states


def uses_queue(config):
  return False


def make_loss(config, pairs):
  """The sum over the pairs (builder.py: ctr(q1, k2) + ctr(q2, k1)) of the mean over rows of
  `losses.moco_v3`, each target view's keys gathered from every device, in global order.
  Metric: the online-target cosine of the positives."""
  temp = config.sce.temp

  def local(qs, zs, queue):
    n = next(iter(zs.values())).shape[0]
    index = jax.lax.axis_index(DATA) * n + jnp.arange(n)  # this device's rows' keys
    ctr = lambda q, z: losses.moco_v3(q, jax.lax.all_gather(z, DATA, tiled=True), index,
                                      temp=temp)
    loss, pos_sim = losses.pair_mean(ctr, qs, zs, pairs)
    return loss * len(pairs), {"pos_sim": pos_sim}

  return local

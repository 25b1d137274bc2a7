"""Networks: torchvision-layout ResNets, timm-layout ViTs, MLP heads and the SCE model."""
from sce_jax.models.heads import MLP
from sce_jax.models.resnet import ResNet
from sce_jax.models.sce import (DTYPES, TRUNKS, SCENet, feature_dim, is_vit, make_models,
                                make_trunk)
from sce_jax.models.vit import ViT

__all__ = ["DTYPES", "MLP", "ResNet", "SCENet", "TRUNKS", "ViT", "feature_dim", "is_vit",
           "make_models", "make_trunk"]

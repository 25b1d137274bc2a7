"""Networks: trunk families (torchvision-layout ResNets, timm-layout ViTs), MLP heads and the
SCE model."""
from sce_jax.models.heads import MLP
from sce_jax.models.resnet import ResNet
from sce_jax.models.sce import DTYPES, SCENet, make_models
from sce_jax.models.trunks import TRUNKS, feature_dim, make_trunk
from sce_jax.models.vit import ViT

__all__ = ["DTYPES", "MLP", "ResNet", "SCENet", "TRUNKS", "ViT", "feature_dim", "make_models",
           "make_trunk"]

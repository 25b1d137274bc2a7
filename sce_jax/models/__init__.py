"""Networks: torchvision-layout ResNets, MLP heads and the SCE model."""
from sce_jax.models.heads import MLP
from sce_jax.models.resnet import ARCHS, ResNet, feature_dim
from sce_jax.models.sce import DTYPES, SCENet, make_models, make_trunk

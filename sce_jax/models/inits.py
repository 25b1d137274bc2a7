"""Initialisers of the authors' networks (docs/SCE.md section 4, Initialisation).

Their trunk is torchvision's ResNet, whose convolutions and BatchNorms torchvision initialises
itself (BatchNorm: scale 1, bias 0, Flax's defaults too; zero_init_residual False); the rest,
the CIFAR stem they put in its place and the heads' nn.Linear layers, keep PyTorch's defaults.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's ResNet, every nn.Conv2d it builds: kaiming_normal_(mode="fan_out",
# nonlinearity="relu"), N(0, 2 / fan_out) with fan_out = kernel area x output channels.
torchvision_conv = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's nn.Linear and nn.Conv2d weight: kaiming_uniform_(a=sqrt(5)), U(-1, 1) / sqrt(fan_in).
torch_default = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# The linear heads on frozen or stop-gradient features (the online probe, the linear
# evaluation): weights N(0, 0.01), zero bias (docs/SCE.md sections 4 and 7: the authors'
# LinearHead).
linear_probe = nn.initializers.normal(0.01)


def torch_default_bias(fan_in):
  """PyTorch's nn.Linear and nn.Conv2d bias, U(-1, 1) / sqrt(fan_in): a Flax bias initialiser
  does not see the layer's input, so the fan-in is given."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)

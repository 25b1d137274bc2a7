"""Projector and predictor MLPs (docs/SCE.md section 4).

A linear layer has a bias only when no BatchNorm follows it; the projector's last BatchNorm
(ImageNet) has no affine parameters.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sce_jax.models import precision
from sce_jax.models.resnet import batch_norm

# torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight.
linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class MLP(nn.Module):
  """`num_layers` linear layers; hidden ones are followed by BN and ReLU.

  Layers are named linear{i} and bn{i}, i counting from 0 like a torch nn.Sequential of
  (Linear, BN, ReLU) groups.
  """
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  last_bn: bool = False   # BN without affine after the last layer (ImageNet projector).
  last_bias: bool = True  # only used when last_bn is False.
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True  # of bfloat16/float16 layers (models/precision.py)

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=linear_init, dtype=self.dtype,
                   name=f"linear{i}",
                   **precision.dense_options(self.dtype, self.f32_weight_grads))(x)
      x = nn.relu(batch_norm(train, f"bn{i}", self.dtype)(x))
    last = self.num_layers - 1
    x = nn.Dense(self.out_dim, use_bias=self.last_bias and not self.last_bn,
                 kernel_init=linear_init, dtype=self.dtype, name=f"linear{last}",
                 **precision.dense_options(self.dtype, self.f32_weight_grads))(x)
    if self.last_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       use_scale=False, use_bias=False, dtype=self.dtype, name=f"bn{last}")(x)
    return x

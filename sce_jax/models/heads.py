"""Projector and predictor MLPs (docs/SCE.md sections 4 and 10).

A linear layer has a bias only when no BatchNorm follows it; the projector's last BatchNorm
(ImageNet) has no affine parameters. Linear layers keep nn.Linear's initialisation
(`inits.torch_default`, and `inits.torch_default_bias` for the bias). The ViT heads (eztorch's
MLPHead with norm_layer None) have no normalisation, so every hidden layer has a bias, and a
GELU activation.
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sce_jax.models import inits
from sce_jax.models import precision
from sce_jax.models.resnet import batch_norm

# model.projector.norm / predictor.norm: after each hidden layer; activations (torch's GELU is
# the exact, erf one).
NORMS = ("batch", "none")
ACTIVATIONS = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False)}


class MLP(nn.Module):
  """`num_layers` linear layers; hidden ones are followed by BN (norm 'batch') and the
  activation.

  Layers are named linear{i} and bn{i}, i counting from 0 like a torch nn.Sequential of
  (Linear, BN, activation) groups.
  """
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  last_bn: bool = False   # BN without affine after the last layer (ImageNet projector).
  last_bias: bool = True  # only used when last_bn is False.
  norm: str = "batch"     # NORMS
  activation: str = "relu"  # ACTIVATIONS
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True  # of bfloat16/float16 layers (models/precision.py)

  @nn.compact
  def __call__(self, x, train: bool = True):
    bn = self.norm == "batch"
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=not bn, kernel_init=inits.torch_default,
                   bias_init=inits.torch_default_bias(x.shape[-1]), dtype=self.dtype,
                   name=f"linear{i}",
                   **precision.dense_options(self.dtype, self.f32_weight_grads))(x)
      if bn:
        x = batch_norm(train, f"bn{i}", self.dtype)(x)
      x = ACTIVATIONS[self.activation](x)
    last = self.num_layers - 1
    x = nn.Dense(self.out_dim, use_bias=self.last_bias and not self.last_bn,
                 kernel_init=inits.torch_default, bias_init=inits.torch_default_bias(x.shape[-1]),
                 dtype=self.dtype, name=f"linear{last}",
                 **precision.dense_options(self.dtype, self.f32_weight_grads))(x)
    if self.last_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       use_scale=False, use_bias=False, dtype=self.dtype, name=f"bn{last}")(x)
    return x

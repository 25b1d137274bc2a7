"""Projector and predictor MLPs (docs/SCE.md sections 4 and 10).

A linear layer has a bias only when no BatchNorm follows it; the projector's last BatchNorm
(ImageNet) has no affine parameters. Linear layers keep nn.Linear's initialisation
(`inits.torch_default`, and `inits.torch_default_bias` for the bias). The ViT heads (eztorch's
MLPHead with norm_layer None) have no normalisation, so every hidden layer has a bias, and a
GELU activation. DINO's head (`DINOHead`, `make` for a projector with a bottleneck_dim) is
its own: the MLP to a bottleneck, L2-normalised, then a weight-normalised prototype layer.
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
# A linear layer's (kernel, bias of its fan-in) initialisers: torch's nn.Linear default, or
# DINO's DINOHead._init_weights: trunc_normal_(std=0.02) truncates at +-2 in absolute terms,
# i.e. +-100 standard deviations, so it is N(0, 0.02^2); biases 0.
INITS = {"torch": (inits.torch_default, inits.torch_default_bias),
         "dino": (nn.initializers.normal(0.02), lambda fan_in: nn.initializers.zeros)}


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
  weight_init: str = "torch"  # INITS (not `init`: a Module method)

  @nn.compact
  def __call__(self, x, train: bool = True):
    bn = self.norm == "batch"
    kernel_init, bias_init = INITS[self.weight_init]
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=not bn, kernel_init=kernel_init,
                   bias_init=bias_init(x.shape[-1]), dtype=self.dtype,
                   name=f"linear{i}",
                   **precision.dense_options(self.dtype, self.f32_weight_grads))(x)
      if bn:
        x = batch_norm(train, f"bn{i}", self.dtype)(x)
      x = ACTIVATIONS[self.activation](x)
    last = self.num_layers - 1
    x = nn.Dense(self.out_dim, use_bias=self.last_bias and not self.last_bn,
                 kernel_init=kernel_init, bias_init=bias_init(x.shape[-1]),
                 dtype=self.dtype, name=f"linear{last}",
                 **precision.dense_options(self.dtype, self.f32_weight_grads))(x)
    if self.last_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       use_scale=False, use_bias=False, dtype=self.dtype, name=f"bn{last}")(x)
    return x


class DINOHead(nn.Module):
  """DINO's head (facebookresearch/dino vision_transformer.py DINOHead): the MLP (`num_layers`
  linear layers, BN only with norm 'batch', GELU) to `bottleneck_dim`, DINO's initialisation;
  its output L2-normalised; then `last_layer`, a linear layer without bias to `out_dim`, weight
  normalised (torch's weight_norm: w = g v / |v| per output unit, v of nn.Linear's default
  init, g filled with 1). norm_last_layer: g stays 1 and is no parameter (the reference's
  requires_grad False), else g is a parameter `scale`. Computed in float32 from the bottleneck
  on (the softmax over 65,536 prototypes)."""
  hidden_dim: int
  out_dim: int
  bottleneck_dim: int
  num_layers: int = 3
  norm: str = "none"
  activation: str = "gelu"
  norm_last_layer: bool = True
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = MLP(self.hidden_dim, self.bottleneck_dim, self.num_layers, norm=self.norm,
            activation=self.activation, dtype=self.dtype, f32_weight_grads=self.f32_weight_grads,
            weight_init="dino", name="mlp")(x, train)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
    return WeightNormDense(self.out_dim, self.norm_last_layer, name="last_layer")(x)


class WeightNormDense(nn.Module):
  """x @ (g v / |v|), the norm of each output unit's column of v (torch weight_norm, dim 0 of
  its (out, in) weight); g is 1 and no parameter with fixed_scale."""
  features: int
  fixed_scale: bool = True

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel", inits.torch_default, (x.shape[-1], self.features))
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if not self.fixed_scale:
      w = w * self.param("scale", nn.initializers.ones, (self.features,))
    return x @ w


def make(head_cfg, **kw):
  """The head of a config section (model.projector, model.predictor): DINO's where it has a
  bottleneck_dim > 0 (its MLP's last_bn / last_bias are DINO's: none / a bias), else the MLP.
  kw: dtype, f32_weight_grads."""
  cfg = dict(head_cfg)
  bottleneck, norm_last_layer = cfg.pop("bottleneck_dim", 0), cfg.pop("norm_last_layer", True)
  if not bottleneck:
    return MLP(**cfg, **kw)
  return DINOHead(cfg["hidden_dim"], cfg["out_dim"], bottleneck, cfg["num_layers"],
                  cfg["norm"], cfg["activation"], norm_last_layer, **kw)

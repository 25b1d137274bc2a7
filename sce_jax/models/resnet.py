"""ResNets laid out like torchvision's (docs/SCE.md section 4).

Module names follow torchvision's state-dict keys (`layer1_0/conv1` is `layer1.0.conv1`,
`downsample_0/1` is `downsample.0/1`), padding is symmetric like PyTorch's, and BatchNorm uses
PyTorch's eps and momentum, so weights convert one to one in both directions.
BatchNorm statistics are those of the global batch: under `jax.jit` a batch sharded over the
mesh's `data` axis is reduced across devices by the compiler (synchronised BN, docs/SCE.md 3);
with `bn_splits` > 0 they are those of groups of it (`SplitBatchNorm`, the CIFAR target).
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sce_jax.models import inits
from sce_jax.models import precision


def conv(features, kernel, stride=1, name=None, dtype=jnp.float32, init=inits.torchvision_conv):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=init, dtype=dtype, name=name,
                 **precision.conv_options(dtype))


def batch_norm(train, name=None, dtype=jnp.float32, splits=0):
  """nn.BatchNorm, or `SplitBatchNorm` with `splits` > 0 groups."""
  # PyTorch BN momentum 0.1 is Flax momentum 0.9; eps 1e-5 as in torch.
  kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)
  return SplitBatchNorm(splits, **kw) if splits else nn.BatchNorm(**kw)


class SplitBatchNorm(nn.Module):
  """BatchNorm whose training statistics are those of `num_splits` groups of the batch.

  MoCo's and the authors' SplitBatchNorm2D (docs/SCE.md 3): row n of the batch is in group
  n mod num_splits (torch's `input.view(-1, C * num_splits, H, W)`). Each group's statistics
  normalise its rows; the running statistics move towards the mean over groups of the group
  statistics; inference mode uses the running statistics. Variables have nn.BatchNorm's names,
  shapes and conventions (float32 statistics, biased variance E[x^2] - E[x]^2 in the running
  average too, where torch keeps the unbiased one), so the target stays an EMA of the online
  network and checkpoints do not change.
  """
  num_splits: int
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    y = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # Initialisation may see fewer rows than groups; only shapes matter then.
      splits = 1 if self.is_initializing() else self.num_splits
      y = y.reshape(-1, splits, *x.shape[1:])  # (rows / splits, splits, ..., C)
      axes = (0, *range(2, y.ndim - 1))
      mean = y.mean(axes, keepdims=True)
      var = jnp.maximum(0.0, jnp.square(y).mean(axes, keepdims=True) - jnp.square(mean))
      if not self.is_initializing():
        group_mean = lambda s: s.reshape(splits, -1).mean(0)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean(mean)
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_mean(var)
    y = (y - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_splits: int = 0
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(batch_norm, train, dtype=self.dtype, splits=self.bn_splits)
    y = nn.relu(bn(name="bn1")(conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)))
    y = bn(name="bn2")(conv(self.planes, 3, 1, "conv2", self.dtype)(y))
    return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided, torchvision's v1.5), 1x1 with 4x expansion (ResNet-50/101)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_splits: int = 0
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(batch_norm, train, dtype=self.dtype, splits=self.bn_splits)
    y = nn.relu(bn(name="bn1")(conv(self.planes, 1, 1, "conv1", self.dtype)(x)))
    y = nn.relu(bn(name="bn2")(conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)))
    y = bn(name="bn3")(conv(self.planes * 4, 1, 1, "conv3", self.dtype)(y))
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block, x, train):
  out = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out:
    return x
  y = conv(out, 1, block.stride, "downsample_0", block.dtype)(x)
  return batch_norm(train, "downsample_1", block.dtype, block.bn_splits)(y)


class ResNet(nn.Module):
  """Trunk without the classification head; returns pooled features (N, width * 8 * exp)."""
  stage_sizes: Sequence[int]
  block: Any
  width: int = 64
  small_stem: bool = False  # 3x3 stride-1 stem, no max-pool (32-pixel images, docs/SCE.md 4).
  dtype: Any = jnp.float32
  bn_splits: int = 0        # > 0: every BatchNorm is a SplitBatchNorm (shuffle-BN target).

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.astype(self.dtype)
    if self.small_stem:  # The authors' replacement nn.Conv2d keeps PyTorch's init (docs 4).
      x = conv(self.width, 3, 1, "conv1", self.dtype, inits.torch_default)(x)
    else:
      x = conv(self.width, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(batch_norm(train, "bn1", self.dtype, self.bn_splits)(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(self.width * 2**i, stride, self.dtype, self.bn_splits,
                       name=f"layer{i + 1}_{j}")(x, train)
    return jnp.mean(x, axis=(1, 2))


WIDTH = 64  # the standard base width; model.width 0 stands for it.
ARCHS = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
}


def resnet(name: str, **kwargs) -> ResNet:
  stages, block = ARCHS[name]
  return ResNet(stages, block, **kwargs)


def feature_dim(name: str, width: int = 64) -> int:
  stages, block = ARCHS[name]
  return width * 8 * block.expansion

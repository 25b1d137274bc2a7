"""ResNets laid out like torchvision's (docs/SCE.md section 4).

Module names follow torchvision's state-dict keys (`layer1_0/conv1` is `layer1.0.conv1`,
`downsample_0/1` is `downsample.0/1`), padding is symmetric like PyTorch's, and BatchNorm uses
PyTorch's eps and momentum, so weights convert one to one in both directions.
BatchNorm statistics are those of the global batch: under `jax.jit` a batch sharded over the
mesh's `data` axis is reduced across devices by the compiler (synchronised BN, docs/SCE.md 3).
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features, kernel, stride=1, name=None, dtype=jnp.float32):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def batch_norm(train, name=None, dtype=jnp.float32, scale_init=nn.initializers.ones):
  # PyTorch BN momentum 0.1 is Flax momentum 0.9; eps 1e-5 as in torch.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      scale_init=scale_init, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(batch_norm, train, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)))
    y = bn(name="bn2")(conv(self.planes, 3, 1, "conv2", self.dtype)(y))
    return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided, torchvision's v1.5), 1x1 with 4x expansion (ResNet-50/101)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(batch_norm, train, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.planes, 1, 1, "conv1", self.dtype)(x)))
    y = nn.relu(bn(name="bn2")(conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)))
    y = bn(name="bn3")(conv(self.planes * 4, 1, 1, "conv3", self.dtype)(y))
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block, x, train):
  out = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out:
    return x
  y = conv(out, 1, block.stride, "downsample_0", block.dtype)(x)
  return batch_norm(train, "downsample_1", block.dtype)(y)


class ResNet(nn.Module):
  """Trunk without the classification head; returns pooled features (N, width * 8 * exp)."""
  stage_sizes: Sequence[int]
  block: Any
  width: int = 64
  small_stem: bool = False  # 3x3 stride-1 stem, no max-pool (32-pixel images, docs/SCE.md 4).
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.astype(self.dtype)
    if self.small_stem:
      x = conv(self.width, 3, 1, "conv1", self.dtype)(x)
    else:
      x = conv(self.width, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(self.width * 2**i, stride, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    return jnp.mean(x, axis=(1, 2))


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

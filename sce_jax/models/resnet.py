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


def conv(features, kernel, stride=1, name=None, dtype=jnp.float32, init=inits.torchvision_conv,
         f32_weight_grads=True):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=init, dtype=dtype, name=name,
                 **precision.conv_options(dtype, f32_weight_grads))


def batch_norm(train, name=None, dtype=jnp.float32, splits=0, positions=None):
  """nn.BatchNorm, or `SplitBatchNorm` with `splits` > 0 groups of the rows at `positions`."""
  # PyTorch BN momentum 0.1 is Flax momentum 0.9; eps 1e-5 as in torch.
  kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)
  if splits:
    return functools.partial(SplitBatchNorm(splits, **kw), positions=positions)
  return nn.BatchNorm(**kw)


class SplitBatchNorm(nn.Module):
  """BatchNorm whose training statistics are those of `num_splits` groups of the batch.

  MoCo's and the authors' SplitBatchNorm2D (docs/SCE.md 3): the row at position p of the batch
  is in group p mod num_splits (torch's `input.view(-1, C * num_splits, H, W)`). Each group's
  statistics normalise its rows; the running statistics move towards the mean over groups of
  the group statistics; inference mode uses the running statistics. `positions` (N,) places
  the rows in another order: a random permutation is shuffle-BN without moving an image
  between devices (a group's sums over a sharded batch are one (num_splits, C) all-reduce).
  Variables have nn.BatchNorm's names, shapes and conventions (float32 statistics, biased
  variance E[x^2] - E[x]^2 in the running average too, where torch keeps the unbiased one), so
  the target stays an EMA of the online network and checkpoints do not change.
  """
  num_splits: int
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions=None):
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
      n, spatial = x.shape[0], tuple(range(1, x.ndim - 1))
      group = (jnp.arange(n) if positions is None else positions) % splits
      member = jax.nn.one_hot(group, splits, dtype=jnp.float32)  # (N, splits)
      # Means over each group's rows: exact 0/1 weights, float32 sums ("highest" on a TPU).
      group_mean = lambda v: jnp.einsum("ns,nc->sc", member, v.mean(spatial),
                                        precision="highest") * (splits / n)
      mean = group_mean(y)
      var = jnp.maximum(0.0, group_mean(jnp.square(y)) - jnp.square(mean))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.mean(0)
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var.mean(0)
      rows = lambda s: s[group].reshape(n, *(1 for _ in spatial), -1)  # each row's group's
      mean, var = rows(mean), rows(var)
    y = (y - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_splits: int = 0
  f32_weight_grads: bool = True
  expansion = 1

  @nn.compact
  def __call__(self, x, train, positions=None):
    bn = functools.partial(batch_norm, train, dtype=self.dtype, splits=self.bn_splits,
                           positions=positions)
    cv = functools.partial(conv, dtype=self.dtype, f32_weight_grads=self.f32_weight_grads)
    y = nn.relu(bn(name="bn1")(cv(self.planes, 3, self.stride, "conv1")(x)))
    y = bn(name="bn2")(cv(self.planes, 3, 1, "conv2")(y))
    return nn.relu(y + _shortcut(self, x, train, positions))


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided, torchvision's v1.5), 1x1 with 4x expansion (ResNet-50/101)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_splits: int = 0
  f32_weight_grads: bool = True
  expansion = 4

  @nn.compact
  def __call__(self, x, train, positions=None):
    bn = functools.partial(batch_norm, train, dtype=self.dtype, splits=self.bn_splits,
                           positions=positions)
    cv = functools.partial(conv, dtype=self.dtype, f32_weight_grads=self.f32_weight_grads)
    y = nn.relu(bn(name="bn1")(cv(self.planes, 1, 1, "conv1")(x)))
    y = nn.relu(bn(name="bn2")(cv(self.planes, 3, self.stride, "conv2")(y)))
    y = bn(name="bn3")(cv(self.planes * 4, 1, 1, "conv3")(y))
    return nn.relu(y + _shortcut(self, x, train, positions))


def _shortcut(block, x, train, positions):
  out = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out:
    return x
  y = conv(out, 1, block.stride, "downsample_0", block.dtype,
           f32_weight_grads=block.f32_weight_grads)(x)
  return batch_norm(train, "downsample_1", block.dtype, block.bn_splits, positions)(y)


class ResNet(nn.Module):
  """Trunk without the classification head; returns pooled features (N, width * 8 * exp)."""
  stage_sizes: Sequence[int]
  block: Any
  width: int = 64
  small_stem: bool = False  # 3x3 stride-1 stem, no max-pool (32-pixel images, docs/SCE.md 4).
  dtype: Any = jnp.float32
  bn_splits: int = 0        # > 0: every BatchNorm is a SplitBatchNorm (shuffle-BN target).
  f32_weight_grads: bool = True  # of bfloat16/float16 convolutions (models/precision.py)
  remat: bool = False       # recompute each block's activations in the backward pass (sce.py)

  @nn.compact
  def __call__(self, x, train: bool = True, positions=None):
    """positions: (N,) the rows' order for the BatchNorm groups (`SplitBatchNorm`)."""
    # static_argnums counts `self`: `train` (2) is a Python bool.
    block = nn.remat(self.block, static_argnums=(2,)) if self.remat else self.block
    x = x.astype(self.dtype)
    if self.small_stem:  # The authors' replacement nn.Conv2d keeps PyTorch's init (docs 4).
      x = conv(self.width, 3, 1, "conv1", self.dtype, inits.torch_default,
               self.f32_weight_grads)(x)
    else:
      x = conv(self.width, 7, 2, "conv1", self.dtype, f32_weight_grads=self.f32_weight_grads)(x)
    x = nn.relu(batch_norm(train, "bn1", self.dtype, self.bn_splits, positions)(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = block(self.width * 2**i, stride, self.dtype, self.bn_splits,
                       self.f32_weight_grads, name=f"layer{i + 1}_{j}")(x, train, positions)
    return jnp.mean(x, axis=(1, 2))


WIDTH = 64  # the standard base width; model.width 0 stands for it.
ARCHS = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
}


def resnet(name: str, module=ResNet, **kwargs) -> ResNet:
  """ResNet `name` of ARCHS; module: ResNet or a lifted transform of it (sce.make_trunk)."""
  stages, block = ARCHS[name]
  return module(stages, block, **kwargs)


def feature_dim(name: str, width: int = 64) -> int:
  stages, block = ARCHS[name]
  return width * 8 * block.expansion

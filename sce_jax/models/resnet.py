"""ResNets laid out like torchvision's (docs/SCE.md section 4).

Module names follow torchvision's state-dict keys (`layer1_0/conv1` is `layer1.0.conv1`,
`downsample_0/1` is `downsample.0/1`), padding is symmetric like PyTorch's, and BatchNorm uses
PyTorch's eps and momentum, so weights convert one to one in both directions.
The end of the file is the ResNet family's side of models/trunks.py.
BatchNorm statistics are those of the global batch: under `jax.jit` a batch sharded over the
mesh's `data` axis is reduced across devices by the compiler (synchronised BN, docs/SCE.md 3);
with `bn_splits` > 0 they are those of groups of it (`SplitBatchNorm`, the CIFAR target).
"""
import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sce_jax.models import inits
from sce_jax.models import precision


def conv(features, kernel, stride=1, name=None, dtype=jnp.float32, init=inits.torchvision_conv,
         f32_weight_grads=True):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=init, dtype=dtype, name=name,
                 **precision.conv_options(dtype, f32_weight_grads))


def batch_norm(train, name=None, dtype=jnp.float32, splits=0, positions=None,
               scale_init=nn.initializers.ones):
  """nn.BatchNorm, or `SplitBatchNorm` with `splits` > 0 groups of the rows at `positions`."""
  # PyTorch BN momentum 0.1 is Flax momentum 0.9; eps 1e-5 as in torch.
  kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name,
            scale_init=scale_init)
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
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x, positions=None):
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", self.scale_init, features, jnp.float32)
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
  zero_init_residual: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x, train, positions=None):
    bn = functools.partial(batch_norm, train, dtype=self.dtype, splits=self.bn_splits,
                           positions=positions)
    cv = functools.partial(conv, dtype=self.dtype, f32_weight_grads=self.f32_weight_grads)
    y = nn.relu(bn(name="bn1")(cv(self.planes, 3, self.stride, "conv1")(x)))
    y = bn(name="bn2", scale_init=_last_scale_init(self))(cv(self.planes, 3, 1, "conv2")(y))
    return nn.relu(y + _shortcut(self, x, train, positions))


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided, torchvision's v1.5), 1x1 with 4x expansion (ResNet-50/101)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_splits: int = 0
  f32_weight_grads: bool = True
  zero_init_residual: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train, positions=None):
    bn = functools.partial(batch_norm, train, dtype=self.dtype, splits=self.bn_splits,
                           positions=positions)
    cv = functools.partial(conv, dtype=self.dtype, f32_weight_grads=self.f32_weight_grads)
    y = nn.relu(bn(name="bn1")(cv(self.planes, 1, 1, "conv1")(x)))
    y = nn.relu(bn(name="bn2")(cv(self.planes, 3, self.stride, "conv2")(y)))
    y = bn(name="bn3", scale_init=_last_scale_init(self))(cv(self.planes * 4, 1, 1, "conv3")(y))
    return nn.relu(y + _shortcut(self, x, train, positions))


def _last_scale_init(block):
  """torchvision's zero_init_residual: the last BatchNorm of each block starts with scale 0,
  so that the block starts as its shortcut (MoCo v3, docs/SCE.md 12); else 1."""
  return nn.initializers.zeros if block.zero_init_residual else nn.initializers.ones


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
  zero_init_residual: bool = False  # each block's last BN scale starts at 0 (torchvision's)

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
                  self.f32_weight_grads, self.zero_init_residual,
                  name=f"layer{i + 1}_{j}")(x, train, positions)
    return jnp.mean(x, axis=(1, 2))


WIDTH = 64  # the standard base width; model.width 0 stands for it.
ARCHS = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
}


def resnet(name: str, module=ResNet, **kwargs) -> ResNet:
  """ResNet `name` of ARCHS; module: ResNet or a lifted transform of it (trunks.make_trunk)."""
  stages, block = ARCHS[name]
  return module(stages, block, **kwargs)


def feature_dim(name: str, width: int = 64) -> int:
  stages, block = ARCHS[name]
  return width * 8 * block.expansion


# ---------------------------------------------------------------------------------------------
# The trunk family (models/trunks.py): what the rest of sce_jax asks of a ResNet.

NAME = "ResNet"
MODULE = ResNet
HAS_BATCH_STATS = True        # shuffle-BN (sce.target_bn_splits) splits them
TORCH_LAYOUT = "torchvision"  # the weights' torch layout (weights.py)
MARK = "conv1"                # a top-level name of its weights, flax or torch
TORCH_HEAD = "fc"             # torch's name of its classifier (MoCo v3: of its projector)
NO_DECAY = ()                 # parameters without weight decay besides norms and biases
EVAL_KEYS = ()                # model keys evaluation features depend on besides the weights
TINY = dict(width=8)          # the benchmarks' CPU stand-in
UNINFERRED = ""               # what infer_config cannot read from the weights


def build(model_cfg, bn_splits=0, module=ResNet, remat_blocks=False) -> ResNet:
  """The trunk of config.model (trunks.make_trunk); bn_splits > 0: BatchNorm statistics of that
  many groups of the batch (`SplitBatchNorm`), the same variables."""
  return resnet(model_cfg.trunk, module=module, remat=remat_blocks,
                width=model_cfg.width or WIDTH,
                small_stem=model_cfg.small_stem, dtype=jnp.dtype(model_cfg.dtype),
                bn_splits=bn_splits, f32_weight_grads=model_cfg.get("f32_weight_grads", True),
                zero_init_residual=model_cfg.get("zero_init_residual", False))


def feature_width(model_cfg) -> int:
  return feature_dim(model_cfg.trunk, model_cfg.width or WIDTH)


def frozen(model_cfg):
  """Names of trunk parameters that never change: none."""
  del model_cfg
  return ()


def config_problem(model_cfg, crop_sizes) -> str:
  """The one-line problem of config.model for a ResNet, or ''."""
  del crop_sizes
  if model_cfg.freeze_patch_embed or model_cfg.drop_path:
    return (f"model.freeze_patch_embed and model.drop_path apply to ViT trunks, not "
            f"{model_cfg.trunk}; leave them at False and 0.")
  return ""


def describe(model_cfg) -> str:
  """'resnet50 (Bottleneck blocks (3, 4, 6, 3)), width 64, small_stem=False', for messages."""
  return (f"{_arch_desc(model_cfg.trunk)}, width {model_cfg.width or WIDTH}, "
          f"small_stem={model_cfg.small_stem}")


def _block_counts(trunk_params):
  """{stage: number of blocks} and whether the blocks are bottlenecks, from module names."""
  counts = {}
  for name in trunk_params:
    m = re.fullmatch(r"layer(\d+)_(\d+)", name)
    if m and "conv1" in trunk_params[name]:  # a block; a stray key alone is not one
      counts[int(m[1])] = max(counts.get(int(m[1]), 0), int(m[2]) + 1)
  stages = tuple(counts.get(i, 0) for i in range(1, max(counts, default=0) + 1))
  return stages, "conv3" in trunk_params.get("layer1_0", {})


def _arch_of(trunk_params):
  """(ARCHS name or None, a description) of a trunk, from its module names."""
  stages, bottleneck = _block_counts(trunk_params)
  for name, (sizes, block) in ARCHS.items():
    if tuple(sizes) == stages and (block is Bottleneck) == bottleneck:
      return name, _arch_desc(name)
  kind = "Bottleneck" if bottleneck else "BasicBlock"
  return None, (f"a ResNet with {kind} blocks {stages}, which no config builds (known: "
                + ", ".join(_arch_desc(n) for n in ARCHS) + ")")


def _arch_desc(name):
  sizes, block = ARCHS[name]
  return f"{name} ({block.__name__} blocks {tuple(sizes)})"


def describe_weights(trunk_params) -> str:
  return _arch_of(trunk_params)[1]


def check_weights(trunk_params, model_cfg, net) -> list[str]:
  """A trunk's depth against config.model's: ValueError naming both; its width and stem:
  problem lines."""
  arch, got = _arch_of(trunk_params)
  if arch != model_cfg.trunk:
    raise ValueError(f"its {net} trunk is {got}, but the config asks for "
                     f"{_arch_desc(model_cfg.trunk)}: a depth mismatch.")
  stem = np.shape(trunk_params.get("conv1", {}).get("kernel", ()))
  want = (3 if model_cfg.small_stem else 7, model_cfg.width or WIDTH)
  if len(stem) == 4 and (stem[0], stem[3]) != want:
    return [f"the {net} trunk has width {stem[3]} and a {stem[0]}x{stem[0]} stem; the config "
            f"has width {want[1]} and a {want[0]}x{want[0]} stem"]
  return []


def infer_config(trunk_params, num_heads=0) -> dict:
  """The config.model keys that a trunk's shapes imply (its depth, width, stem)."""
  del num_heads
  arch, desc = _arch_of(trunk_params)
  if arch is None:
    raise ValueError(f"Unsupported trunk: {desc}.")
  stem = np.shape(trunk_params.get("conv1", {}).get("kernel", ()))
  width, small_stem = (int(stem[3]), stem[0] == 3) if len(stem) == 4 else (64, False)
  return dict(trunk=arch, width=width, small_stem=bool(small_stem))

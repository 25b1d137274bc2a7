"""Vision Transformers laid out like timm's (docs/SCE.md section 10).

Module names follow timm's state-dict keys (`blocks_3/attn/qkv` is `blocks.3.attn.qkv`,
`patch_embed/proj` is `patch_embed.proj`), which DeiT, DINO and MoCo v3 share, so weights convert
one to one (weights.py). Pre-norm blocks with LayerNorm eps 1e-6, a fused qkv projection, exact
(erf) GELU as torch's nn.GELU; the class token's output after the final LayerNorm is the
feature (`pool='cls'`), or the mean of the patch tokens after it (`pool='mean'`, big_vision's
'gap').

Precision: the computation runs in `dtype`; parameters, LayerNorm statistics and the attention
softmax are float32 (`jax.nn.dot_product_attention` forms its logits in float32;
implementation=None leaves the kernel to JAX, which in jax 0.10 is XLA's and may become
cuDNN's fused one); the dense layers and the patch projection take
`models/precision.py`'s float32 weight gradients like the ResNet's.

No BatchNorm: nothing depends on the batch, so there are no batch statistics and no shuffle-BN.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sce_jax.models import precision

# model.trunk names: (width, depth, heads), the ViT-Ti/S/B of DeiT and timm and ViT-L of
# Dosovitskiy et al. and timm (MLP ratio 4).
ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
HEAD_DIM = 64  # every standard ViT's width / heads; the heads of another width follow it.
# model.pos_embed: learned, or MoCo v3's fixed 2-D sin-cos table; model.pool: the feature.
POS_EMBEDS = ("learned", "sincos")
POOLS = ("cls", "mean")

# MoCo v3's initialisation (vits.py): xavier-uniform linear layers, the qkv projection as three
# separate D x D matrices (variance 1 / D, which fan_avg of the fused D x 3D kernel gives at
# scale 2), the patch projection as a linear map of a flattened patch, zero biases.
dense_init = nn.initializers.xavier_uniform()
qkv_init = nn.initializers.variance_scaling(2.0, "fan_avg", "uniform")
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                              out_axis=-1)


def dims(name, width=0, depth=0, num_heads=0):
  """(width, depth, heads) of ARCHS[name], each replaced by the given value when it is not 0;
  heads default to width / 64 (the standard table for ViT-Ti/S/B)."""
  std_width, std_depth, _ = ARCHS[name]
  width = width or std_width
  return width, depth or std_depth, num_heads or max(width // HEAD_DIM, 1)


def sincos_table(grid, width, temperature=10_000.0):
  """MoCo v3's fixed 2-D sin-cos position embedding, (1, 1 + grid^2, width), float32.

  Patch token k (row r = k // grid, column c = k % grid) gets [sin(r w), cos(r w), sin(c w),
  cos(c w)] with w_d = temperature^(-d / (width / 4)), d < width / 4; the class token gets 0.
  """
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4))
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  out_r, out_c = np.outer(rows, omega), np.outer(cols, omega)
  table = np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], axis=1)
  return np.concatenate([np.zeros((1, width)), table])[None].astype(np.float32)


def resample_pos_embed(pos_embed, grid):
  """A (1, 1 + g^2, D) table for a (h, w) `grid` of patches: the class token's row as is, the
  patch rows resized bicubically. jax.image's antialiased cubic (Keys a = -0.5, taps clipped
  at the border and renormalised) is torch's `interpolate(mode='bicubic', antialias=True)`,
  which timm's `resample_abs_pos_embed` uses by default."""
  n, width = pos_embed.shape[1] - 1, pos_embed.shape[2]
  old = int(round(n ** 0.5))
  if (old, old) == tuple(grid):
    return pos_embed
  if old * old != n:
    raise ValueError(f"pos_embed has {n} patch rows, not a square grid")
  patches = pos_embed[0, 1:].astype(jnp.float32).reshape(old, old, width)
  patches = jax.image.resize(patches, (*grid, width), method="cubic", antialias=True)
  return jnp.concatenate([pos_embed[:, :1], patches.reshape(1, -1, width).astype(
      pos_embed.dtype)], axis=1)


def _dense(x, features, name, dtype, f32_weight_grads, init=dense_init):
  """A linear layer with a bias. precision.py adds the float32 bias in float32 (its gradient is
  summed in float32); the result goes back to `dtype`, or the residual stream and the attention
  would run in float32."""
  return nn.Dense(features, kernel_init=init, dtype=dtype, name=name,
                  **precision.dense_options(dtype, f32_weight_grads))(x).astype(dtype)


def _layer_norm(name, dtype):
  # Two-pass statistics (as torch), in float32 (force_float32_reductions); output in dtype.
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention: timm's `attn.qkv` (D -> 3D, split as (3, heads, D / heads))
  and `attn.proj`."""
  num_heads: int
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True  # of bfloat16/float16 layers (models/precision.py)

  @nn.compact
  def __call__(self, x):
    b, n, width = x.shape
    qkv = _dense(x, 3 * width, "qkv", self.dtype, self.f32_weight_grads, qkv_init)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, width // self.num_heads), 2, 0)
    y = jax.nn.dot_product_attention(q, k, v)  # scale 1 / sqrt(D / heads); implementation=None
    return _dense(y.reshape(b, n, width), width, "proj", self.dtype, self.f32_weight_grads)


class Mlp(nn.Module):
  """timm's `mlp.fc1` (D -> ratio x D), exact GELU, `mlp.fc2`."""
  ratio: int = 4
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True

  @nn.compact
  def __call__(self, x):
    y = _dense(x, self.ratio * x.shape[-1], "fc1", self.dtype, self.f32_weight_grads)
    return _dense(nn.gelu(y, approximate=False), x.shape[-1], "fc2", self.dtype,
                  self.f32_weight_grads)


class Block(nn.Module):
  """Pre-norm block; `drop_path` drops each sample's residual branches (stochastic depth)."""
  num_heads: int
  mlp_ratio: int = 4
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True

  @nn.compact
  def __call__(self, x, train):
    # One keep/drop draw per sample (broadcast over tokens and channels), scaled by 1 / keep.
    drop = functools.partial(nn.Dropout, self.drop_path, broadcast_dims=(1, 2),
                             deterministic=not train)
    x = x + drop()(Attention(self.num_heads, self.dtype, self.f32_weight_grads, name="attn")(
        _layer_norm("norm1", self.dtype)(x)))
    return x + drop()(Mlp(self.mlp_ratio, self.dtype, self.f32_weight_grads, name="mlp")(
        _layer_norm("norm2", self.dtype)(x)))


class PatchEmbed(nn.Module):
  """timm's `patch_embed.proj`: a p x p convolution of stride p, patches in row-major order."""
  width: int
  patch_size: int
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    return nn.Conv(self.width, (p, p), (p, p), padding="VALID", kernel_init=patch_init,
                   dtype=self.dtype, name="proj",
                   **precision.conv_options(self.dtype, self.f32_weight_grads))(x).astype(
                       self.dtype)  # the float32 bias, as `_dense`


class ViT(nn.Module):
  """Trunk without a classifier; returns (N, width) features.

  The position table is laid out for the grid of the images it is initialised with (timm's
  img_size); images of another size use it resampled (`resample_pos_embed`), so one set of
  weights serves the 224-px global crops, the 96-px local ones and any evaluation size.
  """
  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  mlp_ratio: int = 4
  pos_embed: str = "learned"   # POS_EMBEDS
  pool: str = "cls"            # POOLS
  drop_path: float = 0.0       # the last block's rate; block i gets i / (depth - 1) of it
  dtype: Any = jnp.float32
  f32_weight_grads: bool = True  # of bfloat16/float16 layers (models/precision.py)
  remat: bool = False          # recompute each block's activations in the backward pass (sce.py)

  @nn.compact
  def __call__(self, x, train: bool = True):
    # static_argnums counts `self`: `train` (2) is a Python bool.
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    x = PatchEmbed(self.width, self.patch_size, self.dtype, self.f32_weight_grads,
                   name="patch_embed")(
        x.astype(self.dtype))
    b, h, w, _ = x.shape
    # timm's init of a learned table (a normal of std 0.02); the sin-cos one stays fixed
    # (optim.frozen), as MoCo v3's requires_grad=False parameter.
    pos_init = (nn.initializers.normal(0.02) if self.pos_embed == "learned"
                else lambda key, shape: jnp.asarray(sincos_table(h, self.width)))
    # Declared through self.variable: self.param would require this call's grid, not the one
    # the stored table was made for.
    pos = self.variable("params", "pos_embed", lambda: pos_init(
        self.make_rng("params"), (1, 1 + h * w, self.width))).value
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)),
                         x.reshape(b, h * w, self.width)], axis=1)
    x = x + resample_pos_embed(pos, (h, w)).astype(self.dtype)
    rates = np.linspace(0.0, self.drop_path, self.depth)  # timm's and eztorch's rule
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype,
                self.f32_weight_grads, name=f"blocks_{i}")(x, train)
    x = _layer_norm("norm", self.dtype)(x)
    return x[:, 0] if self.pool == "cls" else jnp.mean(x[:, 1:], axis=1)


def vit(name, *, width=0, depth=0, num_heads=0, module=ViT, **kwargs) -> ViT:
  """ViT `name` of ARCHS, with `dims`' overrides (0: the standard value); module: ViT or a
  lifted transform of it (sce.make_trunk)."""
  width, depth, num_heads = dims(name, width, depth, num_heads)
  return module(width, depth, num_heads, **kwargs)

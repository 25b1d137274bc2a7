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
The end of the file is the ViT family's side of models/trunks.py.
"""
import functools
import re
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
# model.pos_resample: how the position table is resampled for another grid of patches
# (`resample_pos_embed`). "timm": timm's resample_abs_pos_embed, antialiased bicubic; "dino":
# DINO's interpolate_pos_encoding, which eztorch's ViT (the authors' SCE ViT runs) copies:
# torch's bicubic without antialiasing, at scale factor (grid + 0.1) / old grid.
POS_RESAMPLES = ("timm", "dino")

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


def dino_weights(old, new):
  """(new, old) interpolation matrix of DINO's resampling along one axis: torch's
  interpolate(mode='bicubic', scale_factor=s, align_corners=False) with s = (new + 0.1) / old
  (DINO's offset against rounding, facebookresearch/dino issue 8), whose output has
  floor(old x s) = new points. Torch maps output i to source (i + 0.5) / s - 0.5 (the given
  s, not old / new: the offset moves the samples) and sums the four taps around it of the
  cubic convolution with A = -0.75, indices clamped to the border; no antialiasing."""
  a, src = -0.75, (np.arange(new) + 0.5) / ((new + 0.1) / old) - 0.5
  base = np.floor(src)
  m = np.zeros((new, old))
  for k in range(-1, 3):
    x = np.abs(src - base - k)  # distance of the tap, in [0, 2)
    w = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                 ((a * x - 5 * a) * x + 8 * a) * x - 4 * a)
    np.add.at(m, (np.arange(new), np.clip(base + k, 0, old - 1).astype(int)), w)
  return m


def resample_pos_embed(pos_embed, grid, method="timm"):
  """A (1, 1 + g^2, D) table for a (h, w) `grid` of patches: the class token's row as is, the
  patch rows resized bicubically by `method` (POS_RESAMPLES). timm: jax.image's antialiased
  cubic (Keys a = -0.5, taps clipped at the border and renormalised) is torch's
  `interpolate(mode='bicubic', antialias=True)`, which timm's `resample_abs_pos_embed` uses by
  default; dino: `dino_weights` along each axis."""
  n, width = pos_embed.shape[1] - 1, pos_embed.shape[2]
  old = int(round(n ** 0.5))
  if (old, old) == tuple(grid):
    return pos_embed
  if old * old != n:
    raise ValueError(f"pos_embed has {n} patch rows, not a square grid")
  patches = pos_embed[0, 1:].astype(jnp.float32).reshape(old, old, width)
  if method == "dino":
    rows, cols = (jnp.asarray(dino_weights(old, g), jnp.float32) for g in grid)
    patches = jnp.einsum("ij,kl,jlc->ikc", rows, cols, patches,
                         precision=jax.lax.Precision.HIGHEST)
  else:
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
  img_size); images of another size use it resampled (`resample_pos_embed` by
  `pos_resample`), so one set of weights serves the 224-px global crops, the 96-px local ones
  and any evaluation size.
  """
  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  mlp_ratio: int = 4
  pos_embed: str = "learned"   # POS_EMBEDS
  pool: str = "cls"            # POOLS
  pos_resample: str = "timm"   # POS_RESAMPLES
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
    # (`frozen`), as MoCo v3's requires_grad=False parameter.
    pos_init = (nn.initializers.normal(0.02) if self.pos_embed == "learned"
                else lambda key, shape: jnp.asarray(sincos_table(h, self.width)))
    # Declared through self.variable: self.param would require this call's grid, not the one
    # the stored table was made for.
    pos = self.variable("params", "pos_embed", lambda: pos_init(
        self.make_rng("params"), (1, 1 + h * w, self.width))).value
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)),
                         x.reshape(b, h * w, self.width)], axis=1)
    x = x + resample_pos_embed(pos, (h, w), self.pos_resample).astype(self.dtype)
    rates = np.linspace(0.0, self.drop_path, self.depth)  # timm's and eztorch's rule
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype,
                self.f32_weight_grads, name=f"blocks_{i}")(x, train)
    x = _layer_norm("norm", self.dtype)(x)
    return x[:, 0] if self.pool == "cls" else jnp.mean(x[:, 1:], axis=1)


def vit(name, *, width=0, depth=0, num_heads=0, module=ViT, **kwargs) -> ViT:
  """ViT `name` of ARCHS, with `dims`' overrides (0: the standard value); module: ViT or a
  lifted transform of it (trunks.make_trunk)."""
  width, depth, num_heads = dims(name, width, depth, num_heads)
  return module(width, depth, num_heads, **kwargs)


# ---------------------------------------------------------------------------------------------
# The trunk family (models/trunks.py): what the rest of sce_jax asks of a ViT.

NAME = "ViT"
MODULE = ViT
HAS_BATCH_STATS = False  # no BatchNorm, so no shuffle-BN
TORCH_LAYOUT = "timm"    # the weights' torch layout (weights.py)
MARK = "cls_token"       # a top-level name of its weights, flax or torch
TORCH_HEAD = "head"      # torch's name of its classifier (MoCo v3: of its projector)
# Parameters without weight decay besides norms and biases (ndim <= 1): the position embedding
# and class token (eztorch's keys_without_decay, docs/SCE.md 10).
NO_DECAY = ("pos_embed", "cls_token")
# model keys the features of an evaluation depend on besides the weights (its provenance).
EVAL_KEYS = ("pos_resample",)
TINY = dict(width=16, depth=2, num_heads=2, patch_size=4)  # the benchmarks' CPU stand-in
# What infer_config cannot read from the weights (convert.py says it), and the flag that sets it.
UNINFERRED = "heads: width / 64, which the weights do not hold; set --num_heads"


def build(model_cfg, bn_splits=0, module=ViT, remat_blocks=False) -> ViT:
  """The trunk of config.model (trunks.make_trunk); a ViT has no BatchNorm to split (bn_splits
  is 0)."""
  del bn_splits
  return vit(model_cfg.trunk, module=module, remat=remat_blocks, width=model_cfg.width, depth=model_cfg.depth,
             num_heads=model_cfg.num_heads, patch_size=model_cfg.patch_size,
             pos_embed=model_cfg.pos_embed, pool=model_cfg.pool,
             pos_resample=model_cfg.get("pos_resample", "timm"), drop_path=model_cfg.drop_path,
             dtype=jnp.dtype(model_cfg.dtype),
             f32_weight_grads=model_cfg.get("f32_weight_grads", True))


def feature_width(model_cfg) -> int:
  return dims(model_cfg.trunk, model_cfg.width)[0]


def frozen(model_cfg):
  """Names of trunk parameters that never change (docs/SCE.md 10), as MoCo v3's parameters with
  requires_grad=False: the sin-cos position table and, with model.freeze_patch_embed, the
  random patch projection."""
  return (("pos_embed",) if model_cfg.pos_embed == "sincos" else ()) + (
      ("patch_embed",) if model_cfg.freeze_patch_embed else ())


def config_problem(model_cfg, crop_sizes) -> str:
  """The one-line problem of config.model for a ViT on crops of `crop_sizes`, or ''."""
  m = model_cfg
  width, _, heads = dims(m.trunk, m.width, m.depth, m.num_heads)
  if width % heads:
    return (f"model.width={width} does not split into model.num_heads={heads} attention "
            "heads; set --config.model.num_heads to a divisor of the width.")
  if m.pos_embed == "sincos" and width % 4:
    return (f"model.pos_embed='sincos' needs a width divisible by 4, not {width}; set "
            "--config.model.width or --config.model.pos_embed=learned.")
  sizes = sorted(crop_sizes)
  if any(s % m.patch_size for s in sizes):
    return (f"model.patch_size={m.patch_size} does not divide the crop sizes {sizes}; set "
            "--config.model.patch_size to a divisor of each (16 for ImageNet, 4 for 32-px "
            "images).")
  return ""


def describe(model_cfg) -> str:
  """'vit_small (width 384, 12 blocks, 6 heads, patch 16)', for messages."""
  width, depth, heads = dims(model_cfg.trunk, model_cfg.width, model_cfg.depth,
                             model_cfg.num_heads)
  return (f"{model_cfg.trunk} (width {width}, {depth} blocks, {heads} heads, patch "
          f"{model_cfg.patch_size})")


def _weight_dims(trunk_params):
  """(width, blocks, patch size) of a ViT trunk, from its shapes and module names."""
  kernel = np.shape(trunk_params.get("patch_embed", {}).get("proj", {}).get("kernel", ()))
  return (int(np.shape(trunk_params["cls_token"])[-1]),
          sum(bool(re.fullmatch(r"blocks_\d+", k)) and "qkv" in trunk_params[k].get("attn", {})
              for k in trunk_params),  # blocks; a stray key alone is not one
          int(kernel[0]) if len(kernel) == 4 else 0)


def describe_weights(trunk_params) -> str:
  return "a ViT of width {}, {} blocks, patch {}".format(*_weight_dims(trunk_params))


def check_weights(trunk_params, model_cfg, net) -> list[str]:
  """A trunk's width, depth and patch against config.model's: ValueError naming both."""
  want = (*dims(model_cfg.trunk, model_cfg.width, model_cfg.depth)[:2], model_cfg.patch_size)
  if _weight_dims(trunk_params) != want:
    raise ValueError(f"its {net} trunk is {describe_weights(trunk_params)}, but the config "
                     f"asks for {describe(model_cfg)}.")
  return []


def infer_config(trunk_params, num_heads=0) -> dict:
  """The config.model keys that a trunk's shapes imply. Its attention heads are not in its
  weights: num_heads, or 0 for width / 64 (the ViT-Ti/S/B table)."""
  width, depth, patch = _weight_dims(trunk_params)
  name = min(ARCHS, key=lambda n: abs(ARCHS[n][0] - width))  # a label: the dims below rule
  return dict(trunk=name, width=width, depth=depth, patch_size=patch,
              num_heads=dims(name, width, depth, num_heads)[2])

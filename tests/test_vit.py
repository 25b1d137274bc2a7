"""ViT trunks (docs/SCE.md section 10): the forward against a float64 NumPy ViT, position-table
resampling against torch's antialiased bicubic, MoCo v3's sin-cos table, stochastic depth,
precision; against timm itself where timm is installed."""
import importlib.util

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import weights
from sce_jax.models import vit
from tests.helpers import np_vit

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install timm "
                                "torch): the comparison with timm's own ViT is skipped")


def _perturbed(variables, seed):
  """Init values plus U(-0.5, 0.5) noise on the LayerNorm, bias, token and position entries
  (init makes them 0 or 1) and x 1.5 on the matrices, so that every parameter matters."""
  rng = np.random.default_rng(seed)

  def move(path, x):
    if path[-1].key == "kernel":
      return np.asarray(x) * 1.5
    return np.asarray(x) + rng.uniform(-0.5, 0.5, x.shape).astype(np.float32)
  return jax.tree.map_with_path(move, variables)


@pytest.mark.parametrize("pool,pos_embed", [("cls", "learned"), ("mean", "sincos")])
def test_forward_matches_numpy(pool, pos_embed):
  """Width 32, 2 blocks of 2 heads, patch 8 on 32-px images (16 tokens + the class token)."""
  model = vit.ViT(32, 2, 2, patch_size=8, pos_embed=pos_embed, pool=pool)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  params = _perturbed(model.init(jax.random.key(0), x, train=False)["params"], 1)
  got = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, x))
  sd = weights.to_torch({"params": {"trunk": params}}, "timm")
  want = np_vit(sd, x, num_heads=2, pool=pool)
  assert got.shape == want.shape == (3, 32) and np.abs(want).max() > 0.5
  # float32 against float64: every value passes ~15 chained operations (LayerNorms, matmuls of
  # <= 128 terms, softmax over 17, erf), each rounding at a few float32 ulps (6e-8 relative) of
  # values of order 1-10, so errors of ~1e-6 relative; 1e-4 of the features' scale bounds them.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name,count", [("vit_tiny", 5_524_416), ("vit_small", 21_665_664),
                                        ("vit_base", 85_798_656), ("vit_large", 303_301_632)])
def test_parameter_counts_match_timm(name, count):
  """timm's vit_*_patch16_224 counts (5,717,416 / 22,050,664 / 86,567,656 / 304,326,632) minus
  the 1000-class head (193,000 / 385,000 / 769,000 / 1,025,000)."""
  shapes = jax.eval_shape(lambda: vit.vit(name).init(jax.random.key(0),
                                                      jnp.zeros((1, 224, 224, 3)), train=False))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count


def _cubic_aa(x):
  """The kernel of torch's antialiased bicubic (PIL's): Keys' cubic with a = -0.5."""
  a, x = -0.5, np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _torch_aa_weights(in_size, out_size):
  """(out, in) interpolation matrix of torch.nn.functional.interpolate(mode='bicubic',
  antialias=True, align_corners=False) along one axis, as ATen's `_compute_indices_weights_aa`
  states it: output i samples at centre (i + 0.5) x scale (scale = in / out); when shrinking
  the kernel is widened by the scale; taps outside [0, in) are dropped and the rest
  renormalised."""
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = scale * (i + 0.5)
    lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
    taps = _cubic_aa((np.arange(lo, hi) - centre + 0.5) / max(scale, 1.0))
    m[i, lo:hi] = taps / taps.sum()
  return m


@pytest.mark.parametrize("old,new", [(14, 6), (14, 12), (14, 24), (4, 2), (2, 4), (7, 3)])
def test_pos_embed_resampling_is_torch_antialiased_bicubic(old, new):
  """The class token's row is kept; the grid is resampled separably (rows, then columns) by
  torch's antialiased bicubic, which timm's resample_abs_pos_embed uses by default."""
  rng = np.random.default_rng(old * new)
  table = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
  got = np.asarray(vit.resample_pos_embed(jnp.asarray(table), (new, new)))
  m = _torch_aa_weights(old, new)
  grid = np.einsum("ij,kl,jlc->ikc", m, m, table[0, 1:].astype(np.float64).reshape(old, old, 8))
  want = np.concatenate([table[0, :1], grid.reshape(-1, 8)])[None]
  # float32 sums of at most 10 x 10 taps (14 -> 6: support 2 x 2.33 a side) of values |v| < 5
  # with weights of absolute sum < 1.3 a side: under 100 x 6e-8 x 5 x 1.7 = 5e-5.
  np.testing.assert_allclose(got, want, atol=5e-5)
  assert vit.resample_pos_embed(table, (old, old)) is table


def _torch_bicubic(grid, scale_factor):
  """torch.nn.functional.interpolate(mode='bicubic', scale_factor=scale_factor,
  align_corners=False) of an (H, W, C) grid, as ATen's upsample_bicubic2d kernel states it,
  one output pixel at a time: floor(H x s) x floor(W x s) outputs; output (i, j) reads the
  source point ((i + 0.5) / s - 0.5, (j + 0.5) / s - 0.5) (the scale factor given, as with
  recompute_scale_factor=None); 4 x 4 taps around it with indices clamped into the grid,
  weighted by the cubic convolution coefficients with A = -0.75 of each axis."""
  a = -0.75

  def coefficients(t):
    x1, x2 = t, 1 - t
    return [((a * (x1 + 1) - 5 * a) * (x1 + 1) + 8 * a) * (x1 + 1) - 4 * a,
            ((a + 2) * x1 - (a + 3)) * x1 * x1 + 1,
            ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1,
            ((a * (x2 + 1) - 5 * a) * (x2 + 1) + 8 * a) * (x2 + 1) - 4 * a]

  h, w = grid.shape[:2]
  out = np.zeros((int(np.floor(h * scale_factor)), int(np.floor(w * scale_factor)),
                  grid.shape[2]))
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      y, x = (i + 0.5) / scale_factor - 0.5, (j + 0.5) / scale_factor - 0.5
      wy, wx = coefficients(y - np.floor(y)), coefficients(x - np.floor(x))
      for m in range(4):
        for n in range(4):
          row = min(max(int(np.floor(y)) - 1 + m, 0), h - 1)
          col = min(max(int(np.floor(x)) - 1 + n, 0), w - 1)
          out[i, j] += wy[m] * wx[n] * grid[row, col]
  return out


@pytest.mark.parametrize("old,new", [(14, 6), (14, 12), (14, 24), (4, 2), (2, 4), (7, 3)])
def test_pos_embed_resampling_dino(old, new):
  """pos_resample='dino': DINO's interpolate_pos_encoding (vision_transformer.py, copied by
  eztorch's trunks/vit.py): the class token's row kept; the grid through torch's bicubic at
  scale factor (new + 0.1) / old, without antialiasing. Not timm's: the samples move by the
  offset and nothing widens the kernel when shrinking."""
  rng = np.random.default_rng(old * new)
  table = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
  got = np.asarray(vit.resample_pos_embed(jnp.asarray(table), (new, new), "dino"))
  grid = _torch_bicubic(table[0, 1:].astype(np.float64).reshape(old, old, 8), (new + 0.1) / old)
  want = np.concatenate([table[0, :1], grid.reshape(-1, 8)])[None]
  # float32 sums of 4 x 4 taps of |v| < 5 with weights of absolute sum < 1.3 a side (A =
  # -0.75 overshoots): well under 16 x 6e-8 x 5 x 1.7 = 8e-6; 5e-5 as the timm test.
  np.testing.assert_allclose(got, want, atol=5e-5)
  timm = np.asarray(vit.resample_pos_embed(jnp.asarray(table), (new, new), "timm"))
  assert np.abs(timm - want).max() > 1e-3  # the two rules differ
  assert vit.resample_pos_embed(table, (old, old), "dino") is table


def test_pos_resample_reaches_the_trunk():
  """model.pos_resample selects the rule in the ViT built from a config; the configs that
  cite eztorch use DINO's."""
  from sce_jax import models  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("cifar10_vit", "smoke")
  assert config.model.pos_resample == "dino"
  assert load_config("imagenet_vit_s16").model.pos_resample == "dino"
  assert load_config("cifar10_r18").model.pos_resample == "timm"  # base()'s
  assert models.make_trunk(config.model).pos_resample == "dino"
  trunk = vit.ViT(16, 1, 2, patch_size=8)  # a 4 x 4 table, applied to a 2 x 2 grid
  variables = _perturbed(trunk.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                    train=False), 0)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  out = {rule: np.asarray(jax.jit(trunk.clone(pos_resample=rule).apply, static_argnames="train")(
      variables, x, train=False)) for rule in vit.POS_RESAMPLES}
  assert np.abs(out["dino"] - out["timm"]).max() > 1e-3


@needs_timm
@pytest.mark.parametrize("old,new", [(14, 6), (14, 24), (14, 10)])
def test_pos_embed_resampling_matches_timm(old, new):
  import torch  # pylint: disable=g-import-not-at-top
  from timm.layers import resample_abs_pos_embed  # pylint: disable=g-import-not-at-top
  table = np.random.default_rng(0).normal(size=(1, 1 + old * old, 24)).astype(np.float32)
  want = resample_abs_pos_embed(torch.tensor(table), (new, new), num_prefix_tokens=1).numpy()
  got = np.asarray(vit.resample_pos_embed(jnp.asarray(table), (new, new)))
  np.testing.assert_allclose(got, want, atol=5e-5)  # both float32: the bound above


def test_sincos_table_is_mocov3s():
  """MoCo v3's build_2d_sincos_position_embedding, stated in NumPy from its torch code:
  torch.meshgrid(grid_w, grid_h) ('ij') then flattened, so patch token k has out_w from
  k // grid and out_h from k % grid; [sin(out_w), cos(out_w), sin(out_h), cos(out_h)]; a zero
  row for the class token."""
  grid, width = 4, 16
  pos_dim = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(pos_dim, dtype=np.float32) / pos_dim)
  grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float32),
                               np.arange(grid, dtype=np.float32), indexing="ij")
  out_w, out_h = np.outer(grid_w.ravel(), omega), np.outer(grid_h.ravel(), omega)
  want = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
  want = np.concatenate([np.zeros((1, width)), want])[None]
  np.testing.assert_allclose(vit.sincos_table(grid, width), want, atol=1e-6)


def test_drop_path_drops_whole_samples():
  """A block at drop rate 0.5 keeps or drops each residual branch for a sample as a whole:
  a sample whose two branches are both dropped (p 1/4) leaves the block unchanged, every token
  and channel; in inference mode nothing is dropped."""
  block = vit.Block(2, drop_path=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 5, 8)), jnp.float32)
  v = block.init(jax.random.key(0), x, train=False)
  y = block.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
  same = np.all(np.asarray(y) == np.asarray(x), axis=(1, 2))
  differ = np.all(np.asarray(y) != np.asarray(x), axis=(1, 2))
  assert np.all(same | differ)  # never some tokens or channels of a sample only
  assert 6 <= same.sum() <= 28, same.sum()  # binomial(64, 1/4): mean 16, sd 3.5
  assert not np.any(np.all(np.asarray(block.apply(v, x, train=False)) == np.asarray(x),
                           axis=(1, 2)))


def test_drop_path_rises_linearly_to_the_last_block():
  """Rates run linearly from 0 (first block) to drop_path (last, timm's and eztorch's rule):
  with drop_path 1 over 2 blocks, training skips the second block exactly, so the output is a
  1-block ViT's with the same weights."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  two = vit.ViT(16, 2, 2, patch_size=4, drop_path=1.0)
  params = _perturbed(two.init(jax.random.key(0), x, train=False)["params"], 2)
  got = two.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
  one = {k: v for k, v in params.items() if k != "blocks_1"}
  want = vit.ViT(16, 1, 2, patch_size=4).apply({"params": one}, x, train=False)
  np.testing.assert_array_equal(got, want)


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _eqns(sub)


def test_bfloat16_compute_float32_params_softmax_and_weight_gradients():
  """bfloat16 activations with float32 parameters: every matrix product of the forward,
  attention's included, takes bfloat16 operands (the float32 biases do not promote the
  stream); the softmax's exponentials are float32 (the GELU is erf's, without exp); every
  dense layer and the patch projection take models/precision.py's custom weight gradient (9 = 1
  patch projection + 2 blocks x (qkv, proj, fc1, fc2))."""
  model = vit.ViT(32, 2, 2, patch_size=8, dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert model.apply({"params": params}, x, train=False).dtype == jnp.bfloat16
  forward = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, train=False))(params).jaxpr
  products = [tuple(v.aval.dtype for v in e.invars) for e in _eqns(forward)
              if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert len(products) == 13 and all(d == (jnp.bfloat16,) * 2 for d in products), products
  exps = [e.outvars[0].aval.dtype for e in _eqns(forward) if e.primitive.name == "exp"]
  assert exps == [jnp.float32] * 2, exps  # the forward's only exponentials: a softmax a block
  loss = lambda p: model.apply({"params": p}, x, train=False).astype(jnp.float32).sum()
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  assert sum(e.primitive.name.startswith("custom_vjp") for e in _eqns(jaxpr)) == 9


@needs_timm
def test_matches_timm_vit_small():
  """timm's vit_small_patch16_224 (random weights, perturbed), converted: the same features at
  224 px and, through the resampled position table, at 96 px (timm's dynamic_img_size)."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                          dynamic_img_size=True).eval()
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.02 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  variables = weights.from_torch(sd)
  cfg = weights.infer_model_config(variables)
  assert (cfg.trunk, cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size) == (
      "vit_small", 384, 12, 6, 16)
  model = vit.vit("vit_small")
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  rng = np.random.default_rng(0)
  for size in (224, 96):
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      want = net(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(forward(variables["params"]["trunk"], x))
    # Both float32, summed in other orders over 12 blocks: ~1e-6 of the features' scale (3).
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  back = weights.to_torch(variables, "timm")
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_block_modules_are_timms():
  """The submodule names that weights.py maps to timm's keys."""
  params = jax.eval_shape(lambda: vit.ViT(8, 1, 2, patch_size=4).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))["params"]
  assert set(params) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "norm"}
  assert set(params["blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}
  assert set(params["blocks_0"]["attn"]) == {"qkv", "proj"}
  assert set(params["blocks_0"]["mlp"]) == {"fc1", "fc2"}

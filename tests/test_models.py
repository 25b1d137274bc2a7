"""Networks of docs/SCE.md section 4: torchvision layout, parameter counts, heads; shuffle-BN's
split BatchNorm (section 3) and float32 weight gradients of bfloat16 layers (section 5)."""
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax.models import heads, precision, resnet, sce, trunks
from tests.helpers import load_config


def _params(module, size=32, **kw):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                              jnp.zeros((2, size, size, 3)), **kw))
  return shapes["params"]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,count", [("resnet18", 11_176_512), ("resnet34", 21_284_672),
                                        ("resnet50", 23_508_032), ("resnet101", 42_500_160)])
def test_trunk_parameter_counts_match_torchvision(name, count):
  """torchvision's counts minus the 1000-class fc layer (e.g. 25,557,032 - 2,049,000)."""
  assert _count(_params(resnet.resnet(name), train=False)) == count


def test_torchvision_layout():
  p = _params(resnet.resnet("resnet50"), train=False)
  assert p["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert set(p["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                "downsample_0", "downsample_1"}
  assert "downsample_0" not in p["layer1_1"]
  assert p["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
  small = _params(resnet.resnet("resnet18", small_stem=True), train=False)
  assert small["conv1"]["kernel"].shape == (3, 3, 3, 64)


@pytest.mark.parametrize("small_stem,side", [(True, 32), (False, 8)])
def test_stem_resolution(small_stem, side):
  """The small stem keeps 32x32 into layer1; the ImageNet stem divides by 4."""
  m = resnet.resnet("resnet18", width=4, small_stem=small_stem)
  x = jnp.zeros((1, 32, 32, 3))
  def run():
    v = m.init(jax.random.key(0), x, train=False)
    return m.apply(v, x, train=False, capture_intermediates=True)[1]
  inter = jax.eval_shape(run)["intermediates"]
  assert inter["layer1_0"]["__call__"][0].shape == (1, side, side, 4)


@pytest.mark.parametrize("block,last", [(resnet.BasicBlock, "bn2"), (resnet.Bottleneck, "bn3")])
def test_zero_init_residual_starts_each_block_as_its_shortcut(block, last):
  """torchvision's zero_init_residual (MoCo v3's ImageNet ResNet, model.zero_init_residual):
  the block's last BatchNorm scale starts at 0, every other at 1, so the block starts as
  relu(its shortcut), exactly."""
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
  net = block(planes=8 // block.expansion, zero_init_residual=True)
  variables = net.init(jax.random.key(0), x, False)
  for path, v in traverse_util.flatten_dict(variables["params"]).items():
    if path[-1] == "scale":
      np.testing.assert_array_equal(v, 0.0 if path[0] == last else 1.0, err_msg=str(path))
  np.testing.assert_array_equal(net.apply(variables, x, False), jax.nn.relu(x))
  assert resnet.build(load_config("imagenet_r50", "method=moco_v3").model).zero_init_residual


def test_imagenet_heads():
  c = load_config("cifar10_r18")
  proj = heads.MLP(hidden_dim=2048, out_dim=256, num_layers=3, last_bn=True)
  v = jax.eval_shape(proj.init, jax.random.key(0), jnp.zeros((4, 2048)))
  assert set(v["params"]) == {"linear0", "bn0", "linear1", "bn1", "linear2"}
  assert "bias" not in v["params"]["linear0"] and "bias" not in v["params"]["linear2"]
  assert "bn2" in v["batch_stats"] and "bn2" not in v["params"]  # BN without affine
  pred = heads.MLP(hidden_dim=4096, out_dim=256, num_layers=2, last_bias=False)
  v = jax.eval_shape(pred.init, jax.random.key(0), jnp.zeros((4, 256)))
  assert "bias" not in v["params"]["linear1"]
  cifar = heads.MLP(**c.model.projector)
  v = jax.eval_shape(cifar.init, jax.random.key(0), jnp.zeros((4, 512)))
  assert v["params"]["linear1"]["bias"].shape == (128,)


def test_bfloat16_compute_with_float32_params():
  m = resnet.resnet("resnet18", width=4, small_stem=True, dtype=jnp.bfloat16)
  v = _params(m, 16, train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
  out = jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), jnp.ones((2, 16, 16, 3)),
                                              train=False), jnp.ones((2, 16, 16, 3)), train=False))
  assert out.dtype == jnp.bfloat16


# --- Initialisation: torchvision's ResNet, PyTorch's defaults (docs/SCE.md 4) ----------------


def _assert_law(x, law, scale, where):
  """x's values drawn from N(0, scale^2) ('normal'), U(-scale, scale) ('uniform'), or all equal
  to scale ('constant').

  The sample std s of n values is within 6 standard errors of the law's sigma (a false alarm
  once in 5e8 a check): sigma / sqrt(2n) for a normal law; for a uniform one (fourth moment
  9 sigma^4 / 5) sqrt(var(s^2)) / (2 sigma) = sqrt(0.8 / n) sigma / 2. A uniform sample also
  reaches its bound: max |x| < (1 - e) scale has probability (1 - e)^n < exp(-n e), 8e-7 at
  e = 14 / n; a normal law of the same sigma would exceed the bound.
  """
  x = np.asarray(x, np.float64).ravel()
  n = x.size
  if law == "constant":
    assert (x == scale).all(), where
    return
  sigma, se = (scale, 1 / np.sqrt(2 * n)) if law == "normal" else (
      scale / np.sqrt(3), np.sqrt(0.8 / n) / 2)
  assert abs(x.std() / sigma - 1) < 6 * se, (where, x.std(), sigma)
  assert abs(x.mean()) < 6 * sigma / np.sqrt(n), where
  if law == "uniform":
    assert (1 - 14 / n) * scale < np.abs(x).max() <= scale, where


@pytest.mark.parametrize("name", [
    "cifar10_r18",
    pytest.param("imagenet_r50", marks=pytest.mark.slow)])  # 80 s on the shared 2-core box
def test_initial_weights_follow_the_authors_initialisers(name):
  """Every parameter of the online network at its initialiser in the authors' code, which
  builds torchvision's ResNet and PyTorch layers (docs/SCE.md 4, Initialisation):
  - convolutions: torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"),
    N(0, 2 / fan_out) with fan_out = kh * kw * out; except the CIFAR stem, an nn.Conv2d put in
    after torchvision's init, at PyTorch's default U(-1, 1) / sqrt(fan_in), fan_in = kh * kw * in;
  - BatchNorm: scale 1, bias 0 (zero_init_residual is off);
  - heads: nn.Linear's default, weight and bias U(-1, 1) / sqrt(fan_in);
  - the online probe: the authors' linear head, N(0, 0.01) and a zero bias.
  """
  model = load_config(name).model
  net = sce.SCENet(model, num_classes=10)
  params = jax.jit(lambda k: net.init(k, jnp.zeros((2, 32, 32, 3)), train=False))(
      jax.random.key(0))["params"]
  flat = traverse_util.flatten_dict(params)
  if model.small_stem:  # The CIFAR projector's last layer has a bias (docs/SCE.md 4).
    assert ("projector", "linear1", "bias") in flat
  for path, x in flat.items():
    where, layer = "/".join(path), flat.get((*path[:-1], "kernel"))
    if path[0] == "probe":
      law = ("normal", 0.01) if path[-1] == "kernel" else ("constant", 0.0)
    elif layer is None:  # BatchNorm
      law = ("constant", 1.0 if path[-1] == "scale" else 0.0)
    elif layer.ndim == 4 and path == ("trunk", "conv1", "kernel") and model.small_stem:
      law = ("uniform", 1 / np.sqrt(np.prod(x.shape[:3])))
    elif layer.ndim == 4:
      kh, kw, _, out = x.shape
      law = ("normal", np.sqrt(2 / (kh * kw * out)))
    else:  # Linear layers of the heads, weight or bias.
      law = ("uniform", 1 / np.sqrt(layer.shape[0]))
    _assert_law(x, *law, where)


# --- Shuffle-BN's SplitBatchNorm (docs/SCE.md 3) ----------------------------------------------


def _numpy_split_bn_block(x, kernel, scale, bias, mean, var, splits, train):
  """float64 NumPy statement of conv 3x3 (stride 1, padding 1) -> SplitBatchNorm2D -> ReLU.

  SplitBatchNorm2D as MoCo's and the authors' (docs/SCE.md 3), in torch's NCHW: training views
  the batch as (N / splits, splits * C, H, W), so row n is in group n mod splits, and runs
  batch_norm on it with the running statistics tiled per group; each group's copy of the
  running statistics moves by momentum 0.1 towards its group's statistics, and the layer keeps
  the mean over groups. Inference normalises with the running statistics. One convention
  differs from torch: torch moves running_var towards the unbiased group variance (x n/(n-1));
  sce_jax's BatchNorm (Flax's, and `resnet.SplitBatchNorm`, which follows it so that the target
  stays an EMA of the online network) uses the biased one everywhere; so does this statement.
  Returns (output NHWC, new running mean, new running var).
  """
  n, h, w, c = x.shape
  windows = np.lib.stride_tricks.sliding_window_view(
      np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
  y = np.einsum("nhwcij,ijco->nohw", windows, kernel)  # NCHW, as torch
  c = y.shape[1]
  if not train:
    norm = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    out = norm * scale[:, None, None] + bias[:, None, None]
    return np.maximum(out, 0).transpose(0, 2, 3, 1), mean, var
  groups = y.reshape(n // splits, splits * c, h, w)  # torch: input.view(-1, C * splits, H, W)
  g_mean = groups.mean(axis=(0, 2, 3))
  g_var = groups.var(axis=(0, 2, 3))  # biased (see above)
  norm = (groups - g_mean[:, None, None]) / np.sqrt(g_var[:, None, None] + 1e-5)
  out = (norm * np.tile(scale, splits)[:, None, None] + np.tile(bias, splits)[:, None, None])
  running = lambda old, new: (0.9 * np.tile(old, splits) + 0.1 * new).reshape(splits, c).mean(0)
  return (np.maximum(out.reshape(n, c, h, w), 0).transpose(0, 2, 3, 1),
          running(mean, g_mean), running(var, g_var))


class _ConvBlock(nn.Module):
  splits: int

  @nn.compact
  def __call__(self, x, train, positions=None):
    x = resnet.conv(8, 3, name="conv")(x)
    return nn.relu(resnet.batch_norm(train, "bn", splits=self.splits, positions=positions)(x))


@pytest.mark.parametrize("train", [True, False])
def test_split_batch_norm_matches_numpy(train):
  """A conv block with 4 groups of a 12-image batch, against the NumPy statement, from
  non-trivial parameters and running statistics."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 5, 5, 3)).astype(np.float32)
  block = _ConvBlock(4)
  v = block.init(jax.random.key(0), jnp.asarray(x), train=True)
  v = jax.tree.map(lambda a: a + rng.uniform(0.5, 1.5, a.shape).astype(np.float32), v)
  out, upd = block.apply(v, jnp.asarray(x), train=train, mutable=["batch_stats"])
  p, s = v["params"], v["batch_stats"]["bn"]
  want, mean, var = _numpy_split_bn_block(
      x.astype(np.float64), np.asarray(p["conv"]["kernel"], np.float64), p["bn"]["scale"],
      p["bn"]["bias"], s["mean"], s["var"], 4, train)
  # float32 against float64: conv sums of 27 terms and statistics over 3 x 25 values round at
  # a few float32 ulps (1.2e-7) of values of order 1-10; 1e-5 leaves a wide margin.
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["var"], var, rtol=1e-5, atol=1e-6)
  # One group is the plain BatchNorm, same variables.
  plain = _ConvBlock(0)
  assert jax.tree.map(jnp.shape, plain.init(jax.random.key(0), jnp.asarray(x), train=True)) == (
      jax.tree.map(jnp.shape, v))
  got = _ConvBlock(1).apply(v, jnp.asarray(x), train=train, mutable=["batch_stats"])
  ref = plain.apply(v, jnp.asarray(x), train=train, mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, ref)


def test_split_batch_norm_positions_shuffle_the_groups_not_the_rows():
  """Rows at `positions` = the place of each image in a permutation are normalised as the
  permuted batch would be, outputs and statistics in the original order: shuffle-BN with no
  image moved (docs/SCE.md 3)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 5, 5, 3)).astype(np.float32)
  perm = rng.permutation(12)
  block = _ConvBlock(4)
  v = block.init(jax.random.key(0), jnp.asarray(x), train=True)
  shuffled, s_upd = block.apply(v, jnp.asarray(x[perm]), train=True, mutable=["batch_stats"])
  placed, p_upd = block.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"],
                              positions=jnp.asarray(np.argsort(perm)))
  # The same sums in another order: float32 rounding of values of order 1 (1e-6).
  np.testing.assert_allclose(placed, np.asarray(shuffled)[np.argsort(perm)], rtol=1e-5,
                             atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_upd,
               s_upd)
  unshuffled, _ = block.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
  assert np.abs(np.asarray(unshuffled) - np.asarray(placed)).max() > 1e-2  # other groups


# --- float32 weight gradients of bfloat16 layers (models/precision.py) ------------------------


_DN = ("NHWC", "HWIO", "NHWC")


def _conv_vjps(x, w, stride, padding):
  """jax.vjp of `precision.conv_general_dilated` and of plain lax on the same operands:
  ((out, pullback), (plain out, plain pullback))."""
  ours = lambda x, w: precision.conv_general_dilated(x, w, (stride, stride), padding,
                                                     dimension_numbers=_DN)
  plain = lambda x, w: jax.lax.conv_general_dilated(x, w.astype(x.dtype), (stride, stride),
                                                    padding, dimension_numbers=_DN)
  return jax.vjp(ours, x, w), jax.vjp(plain, x, w)


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 1, ((1, 1), (1, 1))), (3, 2, ((1, 1), (1, 1))), (7, 2, ((3, 3), (3, 3))),
    (1, 2, ((0, 0), (0, 0))), (3, 2, "SAME")])
def test_conv_weight_gradient_is_float32(kernel, stride, padding):
  """The bfloat16 convolution's forward pass and input gradient are plain JAX's; its kernel
  gradient is float32 and equals a float32 computation on the same bfloat16 operands."""
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(4, 9, 9, 3)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  (out, pullback), (want, plain_pullback) = _conv_vjps(x, w, stride, padding)
  g = jnp.asarray(rng.normal(size=out.shape), jnp.bfloat16)
  np.testing.assert_array_equal(out, want)
  (dx, dw), (want_dx, _) = pullback(g), plain_pullback(g)
  np.testing.assert_array_equal(dx, want_dx)
  assert dw.dtype == jnp.float32
  # Products of bfloat16 numbers are exact in float32: only the summation order differs.
  f32 = lambda w: jax.lax.conv_general_dilated(x.astype(jnp.float32), w, (stride, stride),
                                               padding, dimension_numbers=_DN,
                                               precision="highest")
  _, f32_pullback = jax.vjp(f32, w.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(dw, f32_pullback(g.astype(jnp.float32))[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride,padding", [(1, ((1, 1), (1, 1))), (2, "VALID")])
def test_conv_with_an_empty_output_has_lax_zero_gradients(stride, padding):
  """A 9x9 kernel on a 3x3 input padded to at most 5x5 has no output position: lax's gradients
  are zeros of the operands' shapes and dtypes, and so are ours."""
  x = jnp.ones((2, 3, 3, 3), jnp.bfloat16)
  w = jnp.ones((9, 9, 3, 5), jnp.float32)
  (out, pullback), (want, plain_pullback) = _conv_vjps(x, w, stride, padding)
  assert out.shape == want.shape == (2, 0, 0, 5)
  for a, b in zip(pullback(out), plain_pullback(want)):
    assert a.dtype == b.dtype and a.shape == b.shape and not np.asarray(a).any()


def test_dense_weight_gradient_is_float32_and_float32_layers_are_plain():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 4, 8)), jnp.bfloat16)
  layer = nn.Dense(5, dtype=jnp.bfloat16, **precision.dense_options(jnp.bfloat16))
  plain = nn.Dense(5, dtype=jnp.bfloat16)
  v = plain.init(jax.random.key(0), x)
  np.testing.assert_array_equal(layer.apply(v, x), plain.apply(v, x))
  g = jnp.asarray(rng.normal(size=(6, 4, 5)), jnp.bfloat16)
  grads = jax.grad(lambda v: jnp.sum(layer.apply(v, x).astype(jnp.float32) * g))(v)
  kernel = grads["params"]["kernel"]
  assert kernel.dtype == jnp.float32
  want = np.einsum("abi,abo->io", np.asarray(x, np.float64), np.asarray(g, np.float64))
  np.testing.assert_allclose(kernel, want, rtol=1e-5, atol=1e-4)  # 24 exact products summed
  np.testing.assert_allclose(grads["params"]["bias"], np.asarray(g, np.float64).sum((0, 1)),
                             rtol=1e-5, atol=1e-4)
  assert precision.conv_options(jnp.float32) == precision.dense_options("float32") == {}


@pytest.mark.parametrize("f32_weight_grads", [True, False])
def test_f32_weight_grads_switch(f32_weight_grads):
  """model.f32_weight_grads=False leaves a bfloat16 network's layers plain Flax (no custom
  VJP anywhere), so the two paths can be compared; True routes every convolution and dense
  layer of the trunk and heads through models/precision.py."""
  config = load_config("cifar10_r18", "smoke")
  config.model.dtype = "bfloat16"
  config.model.f32_weight_grads = f32_weight_grads
  online, _ = sce.make_models(config, num_classes=10)
  x = jnp.ones((2, 8, 8, 3))
  v = online.init(jax.random.key(0), x, train=True)
  loss = lambda p: jnp.sum(online.apply({**v, "params": p}, x, train=True,
                                        mutable=["batch_stats"])[0]["pred"].astype(jnp.float32))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(v["params"]))
  convs_and_denses = 20 + 2  # ResNet-18's convolutions (with 3 shortcuts) and the projector's
  assert jaxpr.count("custom_vjp_call") == (convs_and_denses if f32_weight_grads else 0)


# --- Rematerialisation (model.remat) ----------------------------------------------------------


@pytest.mark.slow  # six compiles of a network's gradient
@pytest.mark.parametrize("trunk", ["resnet18", "vit_tiny"])
def test_remat_keeps_variables_loss_and_gradients(trunk):
  """model.remat=block or full recomputes activations in the backward pass: the same variables
  and, through shuffle-BN's positions (ResNet) or stochastic depth's random draws (ViT: the
  recomputed pass must draw the same masks), the same loss and gradients as none. The
  recomputation repeats the same float32 ops; only XLA's fusion may change the order of a sum,
  whose error is at most eps x its length: 1.2e-7 x 4 x 16 x 16 rows (the largest reduction,
  BatchNorm's and the weight gradients' over the batch and pixels) ~ 1.2e-4 relative."""
  c = load_config("cifar10_r18")
  c.model.update(trunk=trunk, width=8 if trunk == "resnet18" else 32, dtype="float32",
                 depth=2, patch_size=8, drop_path=0.0 if trunk == "resnet18" else 0.5)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  positions = jnp.array([2, 0, 3, 1]) if trunk == "resnet18" else None
  results = {}
  for remat in trunks.REMATS:
    c.model.remat = remat
    net = sce.SCENet(c.model, trunk_bn_splits=2 if trunk == "resnet18" else 0)
    v = net.init(jax.random.key(0), x, bn_positions=positions)

    def loss(params):
      out, upd = net.apply({"params": params, "batch_stats": v.get("batch_stats", {})}, x,
                           bn_positions=positions, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(2)})
      return jnp.sum(out["proj"] ** 2), upd

    (value, upd), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    results[remat] = v, value, upd, grads
  v, value, upd, grads = results["none"]
  for remat in ("block", "full"):
    v2, value2, upd2, grads2 = results[remat]
    assert jax.tree.structure(v2) == jax.tree.structure(v)
    for new, old in ((value2, value), (upd2, upd), (grads2, grads)):
      norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(
          tree))))
      assert norm(jax.tree.map(jnp.subtract, new, old)) <= 1.2e-4 * norm(old), remat
    assert float(value2) > 0 and any(float(jnp.abs(g).max()) > 0 for g in
                                     jax.tree.leaves(grads2))


@pytest.mark.parametrize("name", ["cifar10_r18", "cifar10_vit"])
def test_trunk_family_reads_its_own_weights(name):
  """models/trunks.py: each model.trunk has one family, which recognises the trunk it builds
  from its weights' names, reads back the config keys its shapes imply, and gives its feature
  width."""
  cfg = load_config(name, "smoke").model
  family = trunks.family(cfg)
  assert sum(cfg.trunk in f.ARCHS for f in trunks.FAMILIES) == 1
  params = _params(trunks.make_trunk(cfg), train=False)
  assert trunks.of_weights(params) is family
  assert family.check_weights(params, cfg, "online") == []
  implied = cfg.copy_and_resolve_references()
  implied.update(family.infer_config(params, cfg.num_heads))  # heads are not in the weights
  assert family.describe(implied) == family.describe(cfg)
  feats = jax.eval_shape(lambda: trunks.make_trunk(cfg).init_with_output(
      jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)[0])
  assert feats.shape == (2, trunks.feature_dim(cfg))

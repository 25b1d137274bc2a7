"""Weights (sce_jax/weights.py) and their conversion (sce_jax/convert.py): torch layouts <->
sce_jax, checked against an independent float64 NumPy ResNet and ViT, the authors', timm's and
MoCo v3's key names, and orbax checkpoints. No torch needed; test_matches_torchvision runs where
torchvision is installed (tests/test_vit.py compares with timm where it is installed)."""
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from sce_jax import config as sce_config
from sce_jax import convert, weights
from sce_jax.models import resnet, sce, trunks
from tests import helpers
from tests.helpers import np_vit

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}


# ---------------------------------------------------------------------------------------------
# Fixtures written from torchvision's and eztorch's definitions, not from convert.py.


def torchvision_state(name, rng, width=64, small_stem=False):
  """Random weights under torchvision's exact ResNet keys and shapes (fc included), with
  non-trivial BatchNorm affine parameters and running statistics."""
  stages, bottleneck = ARCHS[name]
  sd = {}

  def conv(key, out, inp, k):
    sd[f"{key}.weight"] = rng.normal(0, np.sqrt(2 / (inp * k * k)), (out, inp, k, k))

  def bn(key, c):
    sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, c)
    sd[f"{key}.bias"] = rng.normal(0, 0.2, c)
    sd[f"{key}.running_mean"] = rng.normal(0, 0.3, c)
    sd[f"{key}.running_var"] = rng.uniform(0.5, 2.0, c)
    sd[f"{key}.num_batches_tracked"] = np.array(1234, np.int64)

  conv("conv1", width, 3, 3 if small_stem else 7)
  bn("bn1", width)
  inplanes, expansion = width, 4 if bottleneck else 1
  for i, blocks in enumerate(stages):
    planes = width * 2**i
    for j in range(blocks):
      p, stride = f"layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
      if bottleneck:
        conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
      else:
        conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
      if j == 0 and (stride != 1 or inplanes != planes * expansion):
        conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
        bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  sd["fc.weight"] = rng.normal(0, 0.01, (1000, inplanes))
  sd["fc.bias"] = np.zeros(1000)
  return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


def mlp_state(prefix, rng, dims, last_bn, last_bias):
  """eztorch MLPHead keys: nn.Sequential of (Linear, BatchNorm1d, ReLU) per hidden layer."""
  sd, n = {}, len(dims) - 1
  for i in range(n):
    last, k = i == n - 1, 3 * i
    sd[f"{prefix}layers.{k}.weight"] = rng.normal(0, 0.1, (dims[i + 1], dims[i]))
    if last and last_bias and not last_bn:
      sd[f"{prefix}layers.{k}.bias"] = rng.normal(0, 0.1, dims[i + 1])
    if not last or last_bn:
      b = f"{prefix}layers.{k + 1}"
      if not last:  # the last BN has affine=False.
        sd[f"{b}.weight"], sd[f"{b}.bias"] = rng.uniform(0.5, 1.5, dims[i + 1]), rng.normal(
            0, 0.1, dims[i + 1])
      sd[f"{b}.running_mean"] = rng.normal(0, 0.1, dims[i + 1])
      sd[f"{b}.running_var"] = rng.uniform(0.5, 2, dims[i + 1])
      sd[f"{b}.num_batches_tracked"] = np.array(7, np.int64)
  return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


def model_cfg(trunk="resnet50", width=64, small_stem=False, heads="imagenet"):
  """config.model with small heads shaped like docs/SCE.md 4 (imagenet: 3-layer projector ending in
  an affine-free BN, 2-layer predictor without bias; cifar: 2-layer projector, no predictor)."""
  m = sce_config.base().model
  m.trunk, m.width, m.small_stem, m.dtype = trunk, width, small_stem, "float32"
  if heads == "imagenet":
    m.projector.update(hidden_dim=24, out_dim=16, num_layers=3, last_bn=True, last_bias=False)
    m.predictor.update(hidden_dim=32, num_layers=2, last_bn=False, last_bias=False)
  else:
    m.projector.update(hidden_dim=24, out_dim=16, num_layers=2, last_bn=False, last_bias=True)
    m.predictor.num_layers = 0
  return m


def random_variables(cfg, rng, num_classes=10):
  """SCE variables (online with probe, target) of the config's shapes, random values."""
  out = {}
  for net, prefix in (("online", ""), ("target", "target_")):
    model = sce.SCENet(cfg, with_predictor=net == "online",
                       num_classes=num_classes if net == "online" else 0)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    for col in ("params", "batch_stats"):  # A ViT with norm-free heads has no batch_stats.
      out[prefix + col] = jax.tree.map(
          lambda s: rng.uniform(0.1, 1.0, s.shape).astype(np.float32), shapes.get(col, {}))
  return out


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------------------------
# A float64 NumPy ResNet (NCHW, torch semantics) to compare the converted Flax trunk with.


def np_conv(x, w, stride):
  """Convolution with symmetric padding k // 2, as torch's Conv2d(padding=k // 2)."""
  out, inp, k, _ = w.shape
  pad = k // 2
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  h, wd = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  cols = np.stack([x[:, :, a:a + stride * (h - 1) + 1:stride, b:b + stride * (wd - 1) + 1:stride]
                   for a in range(k) for b in range(k)], axis=2)  # (n, c, k*k, h, w)
  return np.einsum("nckhw,ock->nohw", cols, w.reshape(out, inp, k * k), optimize=True)


def np_resnet(sd, name, x_nhwc, small_stem=False):
  """Eval-mode torchvision ResNet forward up to the pooled features, in float64."""
  g = {k: v.astype(np.float64) for k, v in sd.items()}
  relu = lambda x: np.maximum(x, 0)

  def bn(x, key):
    m, v, w, b = (g[f"{key}.{s}"][None, :, None, None]
                  for s in ("running_mean", "running_var", "weight", "bias"))
    return (x - m) / np.sqrt(v + 1e-5) * w + b

  def conv_bn(x, key, bn_key, stride=1):
    return bn(np_conv(x, g[f"{key}.weight"], stride), bn_key)

  x = x_nhwc.astype(np.float64).transpose(0, 3, 1, 2)
  x = relu(conv_bn(x, "conv1", "bn1", 1 if small_stem else 2))
  if not small_stem:  # max-pool 3x3, stride 2, padding 1 (padded with -inf).
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    x = np.max([x[:, :, a:a + 2 * h - 1:2, b:b + 2 * w - 1:2] for a in range(3) for b in range(3)],
               axis=0)
  stages, bottleneck = ARCHS[name]
  for i, blocks in enumerate(stages):
    for j in range(blocks):
      p, stride = f"layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
      if bottleneck:  # torchvision v1.5: the stride is on the 3x3 convolution.
        y = relu(conv_bn(x, f"{p}.conv1", f"{p}.bn1"))
        y = relu(conv_bn(y, f"{p}.conv2", f"{p}.bn2", stride))
        y = conv_bn(y, f"{p}.conv3", f"{p}.bn3")
      else:
        y = relu(conv_bn(x, f"{p}.conv1", f"{p}.bn1", stride))
        y = conv_bn(y, f"{p}.conv2", f"{p}.bn2")
      if f"{p}.downsample.0.weight" in g:
        x = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", stride)
      x = relu(x + y)
  return x.mean(axis=(2, 3))


def flax_features(trunk_vars, name, x, width=64, small_stem=False):
  model = resnet.resnet(name, width=width, small_stem=small_stem)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(trunk_vars, x))


# ---------------------------------------------------------------------------------------------
# Numerics: a converted torchvision trunk computes what torch would.


@pytest.mark.parametrize("name,small_stem,size", [
    ("resnet18", True, 32), ("resnet18", False, 64), ("resnet50", False, 64)])
def test_converted_trunk_matches_numpy_forward(tmp_path, name, small_stem, size):
  rng = np.random.default_rng(0)
  sd = torchvision_state(name, rng, small_stem=small_stem)
  path = tmp_path / "tv.safetensors"
  safetensors.numpy.save_file(sd, path)
  trunk = weights.load_trunk(path, model_cfg(name, small_stem=small_stem))
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  got = flax_features(trunk, name, x, small_stem=small_stem)
  want = np_resnet(sd, name, x, small_stem)
  assert got.shape == want.shape == (2, resnet.feature_dim(name))
  assert np.abs(want).max() > 0.1  # features are not all dead.
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 1e-4, rel
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Round trips: identical arrays both ways, names exactly torchvision's.


@pytest.mark.parametrize("name,small_stem,width", [
    ("resnet18", True, 64), ("resnet50", False, 64)])
def test_torchvision_round_trip(tmp_path, name, small_stem, width):
  """torchvision -> sce_jax safetensors -> torchvision safetensors -> sce_jax: no change."""
  sd = torchvision_state(name, np.random.default_rng(1), width, small_stem)
  src, mid, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
  safetensors.numpy.save_file(sd, src)
  convert.main(["in", str(src), str(mid)])
  convert.main(["out", str(mid), str(out)])
  back = safetensors.numpy.load_file(out)
  assert set(back) == {k for k in sd if not k.startswith("fc.")}
  for k, v in back.items():
    if k.endswith("num_batches_tracked"):
      assert v.dtype == np.int64 and v.shape == () and v == 0
    else:
      np.testing.assert_array_equal(v, sd[k], err_msg=k)
  assert_trees_equal(weights.read(mid)[0], weights.read(out)[0])


@pytest.mark.parametrize("cfg", [model_cfg("resnet18", 8, True, "cifar"),
                                 model_cfg("resnet50", 8, False, "imagenet")],
                         ids=["resnet18-cifar", "resnet50-imagenet"])
def test_sce_round_trip(tmp_path, cfg):
  """sce_jax -> authors' layout -> sce_jax keeps every network part (the probe is sce_jax's
  own); sce_jax -> torchvision -> sce_jax keeps each trunk."""
  variables = random_variables(cfg, np.random.default_rng(2))
  back = weights.from_torch(weights.to_torch(variables, "authors"))
  variables["params"].pop("probe")
  assert_trees_equal(back, variables)
  weights.check_variables(back, cfg)
  for which, (params, stats) in (("online", ("params", "batch_stats")),
                                 ("target", ("target_params", "target_batch_stats"))):
    tv = weights.from_torch(weights.to_torch(variables, "torchvision", which))
    assert_trees_equal(tv, {"params": {"trunk": variables[params]["trunk"]},
                            "batch_stats": {"trunk": variables[stats]["trunk"]}})
  path = tmp_path / "sce.safetensors"
  convert.save_safetensors(variables, path)
  assert_trees_equal(weights.read(path)[0], variables)
  inferred = weights.infer_model_config(variables)
  assert (inferred.trunk, inferred.width, inferred.small_stem) == (
      cfg.trunk, cfg.width, cfg.small_stem)
  assert dict(inferred.projector) == dict(cfg.projector)
  assert inferred.predictor.num_layers == cfg.predictor.num_layers


# ---------------------------------------------------------------------------------------------
# ViTs in timm's layout (DeiT's, DINO's, MoCo v3's), docs/SCE.md 10.


def timm_vit_state(rng, width=384, depth=12, patch=16, grid=14, head=True):
  """Random weights under timm's VisionTransformer keys and shapes (qkv bias, a 1000-class head
  when `head`), scaled like trained ones (LayerNorm scales near 1)."""
  sd = {"cls_token": rng.normal(0, 0.02, (1, 1, width)),
        "pos_embed": rng.normal(0, 0.02, (1, 1 + grid * grid, width)),
        "patch_embed.proj.weight": rng.normal(0, 0.02, (width, 3, patch, patch)),
        "patch_embed.proj.bias": rng.normal(0, 0.02, (width,)),
        "norm.weight": rng.uniform(0.5, 1.5, (width,)), "norm.bias": rng.normal(0, 0.1, (width,))}
  for i in range(depth):
    b = f"blocks.{i}"
    for name, (out, inp) in (("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                             ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))):
      sd[f"{b}.{name}.weight"] = rng.normal(0, inp ** -0.5, (out, inp))
      sd[f"{b}.{name}.bias"] = rng.normal(0, 0.02, (out,))
    for norm in ("norm1", "norm2"):
      sd[f"{b}.{norm}.weight"] = rng.uniform(0.5, 1.5, (width,))
      sd[f"{b}.{norm}.bias"] = rng.normal(0, 0.1, (width,))
  if head:
    sd["head.weight"], sd["head.bias"] = rng.normal(0, 0.01, (1000, width)), np.zeros(1000)
  return {k: v.astype(np.float32) for k, v in sd.items()}


def vit_cfg(trunk="vit_tiny", width=32, depth=2, num_heads=2, patch=8):
  """config.model of a ViT with eztorch's norm-free GELU heads (small)."""
  m = sce_config.base().model
  m.update(trunk=trunk, width=width, depth=depth, num_heads=num_heads, patch_size=patch,
           dtype="float32")
  m.projector.update(hidden_dim=24, out_dim=16, num_layers=3, last_bias=True, norm="none",
                     activation="gelu")
  m.predictor.update(hidden_dim=32, num_layers=2, last_bias=False, norm="none",
                     activation="gelu")
  return m


def test_timm_vit_small_in_matches_numpy_forward(tmp_path):
  """`convert in` of a timm ViT-S/16 state dict (classifier head dropped, heads from the
  ViT-S table): its trunk computes the float64 NumPy ViT's features at 224 px."""
  rng = np.random.default_rng(10)
  sd = timm_vit_state(rng)
  src, dst = tmp_path / "vit_s16.safetensors", tmp_path / "in.safetensors"
  safetensors.numpy.save_file(sd, src)
  convert.main(["in", str(src), str(dst)])
  cfg = sce_config.base().model
  cfg.update(trunk="vit_small", dtype="float32")
  trunk = weights.load_trunk(dst, cfg)
  assert trunk["batch_stats"] == {} and "head" not in trunk["params"]
  x = rng.normal(size=(1, 224, 224, 3)).astype(np.float32)
  got = np.asarray(jax.jit(lambda v, x: trunks.make_trunk(cfg).apply(v, x, train=False))(trunk, x))
  want = np_vit(sd, x, num_heads=6)
  assert got.shape == want.shape == (1, 384) and np.abs(want).max() > 0.5
  # float32 against float64 through 12 blocks (the bound of test_vit's tiny model, 6 x the
  # chained operations): 1e-4 of the features' scale.
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_timm_round_trip_and_mocov3_checkpoint(tmp_path):
  """timm -> sce_jax -> timm (`out` picks timm's layout for a ViT) is bit-exact, the head
  dropped. A MoCo v3 training checkpoint (`module.base_encoder.`, `module.momentum_encoder.`,
  their `head` projectors and the predictor) gives the online and target trunks."""
  rng = np.random.default_rng(11)
  sd = timm_vit_state(rng, width=32, depth=2, patch=8, grid=4)
  src, mid, out = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "c"))
  safetensors.numpy.save_file(sd, src)
  convert.main(["in", str(src), str(mid), "--num_heads", "2"])
  convert.main(["out", str(mid), str(out)])
  back = safetensors.numpy.load_file(out)
  assert set(back) == {k for k in sd if not k.startswith("head.")}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  target = timm_vit_state(rng, width=32, depth=2, patch=8, grid=4, head=False)
  moco = {f"module.base_encoder.{k}": v for k, v in sd.items()}
  moco.update({f"module.momentum_encoder.{k}": v for k, v in target.items()})
  moco["module.momentum_encoder.head.0.weight"] = np.zeros((64, 32), np.float32)
  moco["module.predictor.0.weight"] = np.zeros((64, 256), np.float32)
  variables = weights.from_torch({"state_dict": moco})
  assert weights.torch_layout(weights._unwrap(moco)) == "mocov3"  # pylint: disable=protected-access
  assert set(variables) == {"params", "target_params"}
  assert_trees_equal(variables["params"], weights.read(mid)[0]["params"])
  np.testing.assert_array_equal(variables["target_params"]["trunk"]["blocks_1"]["mlp"]["fc2"][
      "kernel"], target["blocks.1.mlp.fc2.weight"].T)
  cfg = vit_cfg()
  weights.check_variables(variables, cfg, layout="mocov3")


def _moco_v3_head_keys(prefix, dims, last_bn):
  """moco-v3 builder.py _build_mlp's state-dict keys and shapes: Linear(bias=False) at 3l,
  BatchNorm1d at 3l + 1 after each hidden layer, the last BN (affine=False) only if last_bn."""
  bn = lambda k, c, affine: {**({f"{k}.weight": (c,), f"{k}.bias": (c,)} if affine else {}),
                             f"{k}.running_mean": (c,), f"{k}.running_var": (c,),
                             f"{k}.num_batches_tracked": ()}
  keys, n = {}, len(dims) - 1
  for l in range(n):
    keys[f"{prefix}{3 * l}.weight"] = (dims[l + 1], dims[l])
    if l < n - 1 or last_bn:
      keys.update(bn(f"{prefix}{3 * l + 1}", dims[l + 1], affine=l < n - 1))
  return keys


@pytest.mark.parametrize("file,head", [("cifar10_r18", "fc"), ("cifar10_vit", "head")])
def test_moco_v3_out_names_the_heads_as_moco_v3(file, head):
  """`convert out --layout mocov3` of the method moco_v3's networks: every key of moco-v3's
  MoCo_ResNet / MoCo_ViT (the projectors under the encoders' fc / head, the predictor; BN-in-MLP
  heads without biases, the last BN without affine) with torch's shapes, under `module.`; read
  back, it gives the online and target trunks."""
  cfg = helpers.load_config(file, "smoke,method=moco_v3").model
  variables = random_variables(cfg, np.random.default_rng(14))
  sd = weights.to_torch(variables, "mocov3")
  feat, hid, out = trunks.feature_dim(cfg), cfg.projector.hidden_dim, cfg.projector.out_dim
  proj = [feat] + [hid] * (cfg.projector.num_layers - 1) + [out]
  want = {**_moco_v3_head_keys(f"module.base_encoder.{head}.", proj, True),
          **_moco_v3_head_keys(f"module.momentum_encoder.{head}.", proj, True),
          **_moco_v3_head_keys("module.predictor.", [out, cfg.predictor.hidden_dim, out],
                               cfg.predictor.last_bn)}
  assert {k: v.shape for k, v in sd.items() if k in want} == want
  trunk = lambda encoder: {k.removeprefix(encoder) for k in sd
                           if k.startswith(encoder) and k not in want}
  base, momentum = trunk("module.base_encoder."), trunk("module.momentum_encoder.")
  assert base == momentum and len(sd) == len(want) + 2 * len(base)
  back = weights.from_torch(sd)
  for collection, tree in variables.items():
    if collection != "params" and tree.get("trunk"):  # the online probe is sce_jax's own
      assert_trees_equal(back[collection], {"trunk": tree["trunk"]})
  assert_trees_equal(back["params"], {"trunk": variables["params"]["trunk"]})


def test_vit_sce_round_trip_in_the_authors_layout():
  """eztorch's ViT heads have no BatchNorm: nn.Sequential(Linear, GELU, Linear, GELU, Linear),
  so layer i is entry 2i; sce_jax -> authors -> sce_jax keeps every part."""
  cfg = vit_cfg()
  variables = random_variables(cfg, np.random.default_rng(12))
  sd = weights.to_torch(variables, "authors")
  assert {k for k in sd if k.startswith("projector.")} == {
      f"projector.layers.{i}.{leaf}" for i in (0, 2, 4) for leaf in ("weight", "bias")}
  assert {k for k in sd if k.startswith("predictor.")} == {
      "predictor.layers.0.weight", "predictor.layers.0.bias", "predictor.layers.2.weight"}
  assert "trunk.blocks.1.attn.qkv.weight" in sd and "momentum_trunk.pos_embed" in sd
  back = weights.from_torch(sd)
  variables["params"].pop("probe")
  variables = {k: v for k, v in variables.items() if v}  # no batch statistics
  assert_trees_equal(back, variables)
  weights.check_variables(back, cfg)
  inferred = weights.infer_model_config(back, num_heads=2)
  assert (inferred.trunk, inferred.width, inferred.depth, inferred.num_heads,
          inferred.patch_size) == ("vit_tiny", 32, 2, 2, 8)
  assert dict(inferred.projector) == dict(cfg.projector)


def test_vit_errors_name_the_mismatch(tmp_path):
  """A ViT file against a ResNet config, or against a ViT of another depth or patch, says
  both; a position table of another (square) grid is accepted: it is resampled."""
  sd = timm_vit_state(np.random.default_rng(13), width=32, depth=2, patch=8, grid=4)
  path = _write(sd, tmp_path)
  with pytest.raises(ValueError, match=r"its online trunk is a ViT of width 32, 2 blocks, patch "
                     r"8, but the config asks for resnet50 \(Bottleneck"):
    weights.load_trunk(path, model_cfg("resnet50", 8))
  with pytest.raises(ValueError, match=r"a ViT of width 32, 2 blocks, patch 8, but the config "
                     r"asks for vit_tiny \(width 32, 3 blocks, 2 heads, patch 8\)"):
    weights.load_trunk(path, vit_cfg(depth=3))
  with pytest.raises(ValueError, match=r"patch 8, but the config asks for .*patch 4\)"):
    weights.load_trunk(path, vit_cfg(patch=4))
  weights.load_trunk(_write(timm_vit_state(np.random.default_rng(13), width=32, depth=2,
                                           patch=8, grid=7), tmp_path, "g7.safetensors"),
                     vit_cfg())
  sd["pos_embed"] = sd["pos_embed"][:, :-1]  # 15 patch rows: no square grid
  with pytest.raises(ValueError, match=r"shape mismatch at pos_embed \(sce_jax "
                     r"params/trunk/pos_embed\): checkpoint \(1, 16, 32\)"):
    weights.load_trunk(_write(sd, tmp_path, "bad.safetensors"), vit_cfg())


# ---------------------------------------------------------------------------------------------
# The authors' (eztorch / CEA-LIST SCE) Lightning checkpoints.


def authors_checkpoint(rng):
  """A Lightning checkpoint of eztorch's SCEModel: R50 trunk (width 8), 3-layer projector with
  an affine-free last BN, 2-layer predictor, momentum copies, and the queue buffers."""
  trunk = {k: v for k, v in torchvision_state("resnet50", rng, width=8).items()
           if not k.startswith("fc.")}
  sd = {f"trunk.{k}": v for k, v in trunk.items()}
  sd.update({f"momentum_trunk.{k}": np.asarray(v + 1) for k, v in trunk.items()})
  sd.update(mlp_state("projector.", rng, [256, 24, 24, 16], last_bn=True, last_bias=False))
  sd.update(mlp_state("momentum_projector.", rng, [256, 24, 24, 16], True, False))
  sd.update(mlp_state("predictor.", rng, [16, 32, 16], last_bn=False, last_bias=False))
  sd["queue"] = rng.normal(size=(16, 64)).astype(np.float32)
  sd["queue_ptr"] = np.zeros(1, np.int64)
  return {"epoch": 3, "global_step": 300, "pytorch-lightning_version": "1.5.10",
          "state_dict": sd, "hyper_parameters": {"queue": {"size": 64}}}


def check_authors_variables(variables, sd):
  p, t = variables["params"], variables["target_params"]
  np.testing.assert_array_equal(p["trunk"]["conv1"]["kernel"],
                                sd["trunk.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(t["trunk"]["layer3_5"]["bn3"]["scale"],
                                sd["momentum_trunk.layer3.5.bn3.weight"])
  np.testing.assert_array_equal(p["projector"]["linear1"]["kernel"],
                                sd["projector.layers.3.weight"].T)
  np.testing.assert_array_equal(variables["batch_stats"]["projector"]["bn2"]["var"],
                                sd["projector.layers.7.running_var"])
  assert "scale" not in p["projector"].get("bn2", {})
  np.testing.assert_array_equal(t["projector"]["bn0"]["scale"],
                                sd["momentum_projector.layers.1.weight"])
  np.testing.assert_array_equal(p["predictor"]["linear1"]["kernel"],
                                sd["predictor.layers.3.weight"].T)
  assert set(p) == {"trunk", "projector", "predictor"} and set(t) == {"trunk", "projector"}


def test_authors_checkpoint_as_safetensors(tmp_path):
  ckpt = authors_checkpoint(np.random.default_rng(3))
  sd = ckpt["state_dict"]
  path = tmp_path / "sce.safetensors"  # a Lightning checkpoint flattened to 'state_dict.<key>'.
  safetensors.numpy.save_file({f"state_dict.{k}": v for k, v in sd.items()}, path)
  variables = weights.read(path)[0]
  check_authors_variables(variables, sd)
  cfg = model_cfg("resnet50", 8)
  cfg.projector.hidden_dim = 24
  weights.check_variables(variables, cfg)
  target = weights.load_trunk(path, cfg, which="target")
  np.testing.assert_array_equal(target["batch_stats"]["bn1"]["mean"],
                                sd["momentum_trunk.bn1.running_mean"])
  # Back out in the authors' layout: the same network keys, without the queue.
  out = tmp_path / "out.safetensors"
  convert.main(["out", str(path), str(out), "--layout", "authors"])
  back = safetensors.numpy.load_file(out)
  assert set(back) == set(sd) - {"queue", "queue_ptr"}
  np.testing.assert_array_equal(back["predictor.layers.0.weight"], sd["predictor.layers.0.weight"])


class _FakeTensor:
  """Just what weights._torch_load asks of a torch.Tensor."""

  def __init__(self, x):
    self.x = x

  def is_floating_point(self):
    return np.issubdtype(self.x.dtype, np.floating)

  def detach(self):
    return self

  def cpu(self):
    return self

  def float(self):
    return _FakeTensor(self.x.astype(np.float32))

  def numpy(self):
    return self.x


def test_authors_lightning_ckpt(tmp_path, monkeypatch):
  """A .ckpt read through torch.load (a stand-in module here): the `state_dict` wrapper is
  unwrapped, and pickled hyper-parameters need allow_pickle."""
  ckpt = authors_checkpoint(np.random.default_rng(4))
  fake = dict(ckpt, state_dict={k: _FakeTensor(v) for k, v in ckpt["state_dict"].items()})
  calls = []

  def load(path, map_location, weights_only):
    calls.append(weights_only)
    if weights_only:
      raise __import__("pickle").UnpicklingError("Weights only load failed: omegaconf.DictConfig")
    return fake

  torch = types.SimpleNamespace(load=load, is_tensor=lambda v: isinstance(v, _FakeTensor))
  monkeypatch.setitem(sys.modules, "torch", torch)
  path = tmp_path / "last.ckpt"
  path.write_bytes(b"not read by the stand-in")
  with pytest.raises(ValueError, match="allow_pickle"):
    weights.read(path)[0]
  check_authors_variables(weights.read(path, allow_pickle=True)[0], ckpt["state_dict"])
  assert calls == [True, False]


# ---------------------------------------------------------------------------------------------
# Errors name the key and the problem.


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
  sd = {k: v for k, v in torchvision_state("resnet50", np.random.default_rng(5), 8).items()}
  return sd, tmp_path_factory.mktemp("r50")


def _write(sd, directory, name="x.safetensors"):
  path = directory / name
  safetensors.numpy.save_file(sd, path)
  return path


def test_error_missing_key(r50_file):
  sd, d = r50_file
  sd = {k: v for k, v in sd.items() if k != "layer2.1.bn2.running_var"}
  with pytest.raises(ValueError, match=r"missing key layer2\.1\.bn2\.running_var .*\(16,\)"):
    weights.load_trunk(_write(sd, d), model_cfg("resnet50", 8))


def test_error_unexpected_key(r50_file):
  sd, d = r50_file
  sd = dict(sd, **{"layer1.0.conv4.weight": np.zeros((8, 8, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key layer1\.0\.conv4\.weight"):
    weights.load_trunk(_write(sd, d), model_cfg("resnet50", 8))


def test_error_shape_mismatch(r50_file):
  sd, d = r50_file
  sd = dict(sd, **{"layer1.0.conv2.weight": np.zeros((8, 4, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight .*checkpoint \(8, 4, 3, 3\), "
                     r"config \(8, 8, 3, 3\)"):
    weights.load_trunk(_write(sd, d), model_cfg("resnet50", 8))
  with pytest.raises(ValueError) as e:  # the CIFAR stem.
    weights.load_trunk(_write(r50_file[0], d), model_cfg("resnet50", 8, small_stem=True))
  assert "width 8 and a 7x7 stem; the config has width 8 and a 3x3 stem" in str(e.value)
  assert "conv1.weight (sce_jax params/trunk/conv1/kernel): checkpoint (8, 3, 7, 7), config " \
      "(8, 3, 3, 3)" in str(e.value)


def test_error_wrong_depth(tmp_path):
  sd = torchvision_state("resnet18", np.random.default_rng(6), 8)
  with pytest.raises(ValueError, match=r"resnet18 \(BasicBlock.*config asks for resnet50 "
                     r"\(Bottleneck blocks \(3, 4, 6, 3\)\).*depth mismatch"):
    weights.load_trunk(_write(sd, tmp_path), model_cfg("resnet50", 8))
  sd = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
  with pytest.raises(ValueError, match=r"BasicBlock blocks \(2, 2, 2, 1\), which no config"):
    weights.load_trunk(_write(sd, tmp_path), model_cfg("resnet18", 8))


def test_error_pth_without_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError.
  path = tmp_path / "resnet50.pth"
  path.write_bytes(b"\x80")
  with pytest.raises(ImportError, match=r"reading \.pth needs PyTorch: pip install torch, or "
                     "convert to safetensors"):
    weights.load_trunk(path, model_cfg())


def test_error_no_target_trunk(r50_file):
  sd, d = r50_file
  with pytest.raises(ValueError, match="no target trunk.*online trunk"):
    weights.load_trunk(_write(sd, d), model_cfg("resnet50", 8), which="target")


# ---------------------------------------------------------------------------------------------
# sce_jax training checkpoints (orbax) and the command line.


def test_orbax_checkpoint_in_and_out(tmp_path, caplog):
  cfg = model_cfg("resnet50", 8)
  variables = random_variables(cfg, np.random.default_rng(7))
  state = dict(step=np.int32(500), **jax.device_put(variables),
               opt_state=({"mu": jnp.ones(3)}, None), queue=jnp.ones((64, 16)),
               queue_ptr=jnp.int32(0), rng=jax.random.key(0))
  manager = ocp.CheckpointManager(tmp_path / "work" / "checkpoints")
  early = {"step": np.int32(100), "params": {"trunk": state["params"]["trunk"]},
           "batch_stats": {"trunk": state["batch_stats"]["trunk"]}}
  manager.save(100, args=ocp.args.Composite(state=ocp.args.StandardSave(early)))
  manager.save(500, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()
  work = tmp_path / "work"
  for which, prefix in (("online", ""), ("target", "target_")):
    trunk = weights.load_trunk(work, cfg, which=which)
    assert_trees_equal(trunk, {"params": variables[prefix + "params"]["trunk"],
                               "batch_stats": variables[prefix + "batch_stats"]["trunk"]})
  step_dir = weights.load_trunk(work / "checkpoints" / "100", cfg)
  assert_trees_equal(step_dir["params"], variables["params"]["trunk"])

  out = tmp_path / "r50.safetensors"
  caplog.clear()
  convert.main(["out", str(work), str(out)])
  assert not caplog.records, caplog.text  # orbax's 4 warnings on reading ('read only', ...)
  tv = safetensors.numpy.load_file(out)
  want = {k for k in torchvision_state("resnet50", np.random.default_rng(0), 8)
          if not k.startswith("fc.")}
  assert set(tv) == want
  np.testing.assert_array_equal(tv["layer4.2.conv3.weight"],
                                variables["params"]["trunk"]["layer4_2"]["conv3"]["kernel"]
                                .transpose(3, 2, 0, 1))
  convert.main(["out", str(work), str(out), "--which", "target"])
  assert_trees_equal(weights.load_trunk(out, cfg)["params"],
                     variables["target_params"]["trunk"])


def test_cli_in_with_config(tmp_path, capsys):
  sd = torchvision_state("resnet18", np.random.default_rng(8), width=4, small_stem=True)
  src, dst = tmp_path / "r18.safetensors", tmp_path / "sce.safetensors"
  safetensors.numpy.save_file(sd, src)
  convert.main(["in", str(src), str(dst), "--config", f"{ROOT}/configs/cifar10_r18.py:smoke"])
  assert "torchvision" in capsys.readouterr().out
  flat = safetensors.numpy.load_file(dst)
  assert "params/trunk/layer4_1/conv2/kernel" in flat
  assert "batch_stats/trunk/layer1_0/bn1/mean" in flat
  assert convert.main(["in", str(src), str(dst), "--config", _r50_config(tmp_path)]) == 1
  assert "depth mismatch" in capsys.readouterr().err


def test_cli_bad_inputs_are_one_line_errors(r50_file, tmp_path, capsys):
  """Each bad input of `python -m sce_jax.convert` is one line naming it (exit status 1), as
  sce_jax.main's errors: a missing, mis-shaped or stray key (a stray key in a block past the
  last is reported as stray, not as a deeper trunk's missing keys), a missing or garbage file,
  a config file that is missing or does not match."""
  sd, _ = r50_file
  vit = timm_vit_state(np.random.default_rng(14), width=32, depth=2, patch=8, grid=4)
  cases = {
      "missing key": ({k: v for k, v in sd.items() if k != "layer2.1.bn2.running_var"}, [],
                      "missing key layer2.1.bn2.running_var"),
      "wrong shape": (dict(sd, **{"layer1.0.conv2.weight": np.zeros((8, 4, 3, 3), np.float32)}),
                      [], "shape mismatch at layer1.0.conv2.weight"),
      "stray key": (dict(vit, **{"blocks.2.attn.extra.weight": np.zeros(4, np.float32)}), [],
                    "unexpected key blocks.2.attn.extra.weight (sce_jax params/trunk/blocks_2/"
                    "attn/extra/scale), shape (4,)"),
      "missing file": (None, [], "No such checkpoint: "),
      "garbage file": (b"not safetensors" * 9, [], "is not a readable safetensors file"),
      "missing config": (vit, ["--config", str(tmp_path / "none.py")], "config file "),
      "other config": (vit, ["--config", f"{ROOT}/configs/cifar10_r18.py:smoke"],
                       "its online trunk is a ViT of width 32, 2 blocks, patch 8, but the config "
                       "asks for resnet18"),
  }
  for name, (content, extra, message) in cases.items():
    src = tmp_path / f"{name.replace(' ', '_')}.safetensors"
    if isinstance(content, bytes):
      src.write_bytes(content)
    elif content is not None:
      safetensors.numpy.save_file(content, src)
    assert convert.main(["in", str(src), str(tmp_path / "out.safetensors"), *extra]) == 1, name
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1 and message in err, (name, err)
  assert not (tmp_path / "out.safetensors").exists()


def test_cli_summary_says_where_the_heads_come_from(tmp_path, capsys):
  """A ViT's attention heads are not in its weights: without --config or --num_heads the
  summary says the count is assumed (width / 64: 1 for a width-32 ViT made with 2); with
  --num_heads it is the one given."""
  src = _write(timm_vit_state(np.random.default_rng(15), width=32, depth=2, patch=8, grid=4),
               tmp_path)
  assert convert.main(["in", str(src), str(tmp_path / "o.safetensors")]) == 0
  assert "1 heads, patch 8) (heads: width / 64, which the weights do not hold; set " \
      "--num_heads)" in capsys.readouterr().out
  assert convert.main(["in", str(src), str(tmp_path / "o.safetensors"), "--num_heads", "2"]) == 0
  out = capsys.readouterr().out
  assert "2 heads, patch 8)) ->" in out and "width / 64" not in out


def _r50_config(tmp_path):
  path = tmp_path / "r50.py"
  path.write_text("from sce_jax import config\n\ndef get_config(arg=None):\n"
                  "  c = config.base()\n  c.model.trunk = 'resnet50'\n  return c\n")
  return str(path)


# ---------------------------------------------------------------------------------------------
# Against torchvision itself, where it is installed (not in CI; run it by hand or on a GPU host).


def test_matches_torchvision(tmp_path):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = torchvision.models.resnet50()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2)
        m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
  model.eval()
  sd = model.state_dict()
  assert set(sd) == set(torchvision_state("resnet50", np.random.default_rng(0)))
  path = tmp_path / "resnet50.pth"
  torch.save(sd, path)
  trunk = weights.load_trunk(path, model_cfg())
  x = np.random.default_rng(9).normal(size=(2, 64, 64, 3)).astype(np.float32)
  model.fc = torch.nn.Identity()
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = flax_features(trunk, "resnet50", x)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 1e-4, rel
  # Export: strict load into torchvision (fc aside) gives back the same weights.
  out = tmp_path / "back.pth"
  convert.main(["out", str(path), str(out)])
  fresh = torchvision.models.resnet50()
  missing, unexpected = fresh.load_state_dict(torch.load(out), strict=False)
  assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
  for k, v in fresh.state_dict().items():
    if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
      assert torch.equal(v, sd[k]), k

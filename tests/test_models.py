"""Networks of docs/SCE.md section 4: torchvision layout, parameter counts, heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax.models import heads, resnet
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

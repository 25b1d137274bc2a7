"""`python -m sce_jax.convert out --layout detectron2`: the .pkl detectron2 loads for a
pretrained ResNet backbone (MoCo's detection/convert-pretrain-to-detectron2.py layout). Its
names and shapes are checked against a list written here from detectron2's ResNet naming
(detectron2/modeling/backbone/resnet.py: BasicStem `stem.conv1`, stages `res2`..`res5` of
BottleneckBlocks `conv1`..`conv3` and `shortcut`, each Conv2d's BatchNorm as its `.norm`); a
torch test loads the arrays into torchvision's ResNet-50 after the inverse renaming."""
import pickle
import re

import numpy as np
import pytest
import safetensors.numpy

from sce_jax import convert
from tests.test_convert import timm_vit_state, torchvision_state

STAGES = (3, 4, 6, 3)  # ResNet-50
BN = ("weight", "bias", "running_mean", "running_var")


def detectron2_r50_shapes(width):
  """{name: shape} of detectron2's ResNet-50 backbone (stem width `width`, 64 in the real one),
  conv weights (out, in, kh, kw)."""
  out = {"stem.conv1.weight": (width, 3, 7, 7)}
  out.update({f"stem.conv1.norm.{p}": (width,) for p in BN})
  inp = width
  for s, blocks in enumerate(STAGES):
    planes = width * 2**s
    for b in range(blocks):
      name = f"res{s + 2}.{b}"
      convs = {"conv1": (planes, inp, 1, 1), "conv2": (planes, planes, 3, 3),
               "conv3": (planes * 4, planes, 1, 1)}
      if b == 0:
        convs["shortcut"] = (planes * 4, inp, 1, 1)
      for conv, shape in convs.items():
        out[f"{name}.{conv}.weight"] = shape
        out.update({f"{name}.{conv}.norm.{p}": (shape[0],) for p in BN})
      inp = planes * 4
  return out


def torchvision_name(key):
  """detectron2 -> torchvision, the inverse of MoCo's renaming."""
  key = key.removeprefix("stem.")
  key = re.sub(r"res(\d)", lambda m: f"layer{int(m[1]) - 1}", key)
  key = re.sub(r"conv(\d)\.norm", r"bn\1", key)
  return key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")


def export(tmp_path, sd):
  src, dst = tmp_path / "r50.safetensors", tmp_path / "r50.pkl"
  safetensors.numpy.save_file(sd, str(src))
  convert.main(["out", "--layout", "detectron2", str(src), str(dst)])
  with open(dst, "rb") as f:
    return pickle.load(f)


def test_names_shapes_and_values(tmp_path):
  sd = torchvision_state("resnet50", np.random.default_rng(0), width=8)
  pkl = export(tmp_path, sd)
  assert pkl["__author__"] == "sce_jax" and pkl["matching_heuristics"] is True
  model = pkl["model"]
  assert {k: v.shape for k, v in model.items()} == detectron2_r50_shapes(8)
  for key, x in model.items():
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, sd[torchvision_name(key)], err_msg=key)
  with pytest.raises(SystemExit):  # argparse: DST must be a .pkl
    convert.main(["out", "--layout", "detectron2", str(tmp_path / "r50.safetensors"),
                  str(tmp_path / "r50.pth")])


def test_loads_into_torchvision_resnet50(tmp_path):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  sd = torchvision_state("resnet50", np.random.default_rng(0))
  model = torchvision.models.resnet50()
  back = {torchvision_name(k): torch.from_numpy(v)
          for k, v in export(tmp_path, sd)["model"].items()}
  missing, unexpected = model.load_state_dict(back, strict=False)
  assert not unexpected
  assert {k for k in missing if not k.endswith("num_batches_tracked")} == {"fc.weight", "fc.bias"}
  for k, v in model.state_dict().items():
    if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
      assert torch.equal(v, torch.from_numpy(sd[k])), k


def test_a_vit_is_refused_in_one_line(tmp_path, capsys):
  """detectron2's layout holds a ResNet: a ViT's weights stop with one line naming the
  family."""
  src = tmp_path / "vit.safetensors"
  safetensors.numpy.save_file(
      timm_vit_state(np.random.default_rng(0), width=32, depth=1, patch=8, grid=2), str(src))
  assert convert.main(["out", "--layout", "detectron2", "--num_heads=2", str(src),
                       str(tmp_path / "vit.pkl")]) != 0
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "Error: the detectron2 layout holds a torchvision-layout (ResNet) trunk; this one is a "
      "ViT.")
  assert not (tmp_path / "vit.pkl").exists()

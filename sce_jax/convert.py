"""Weights in and out on the command line: PyTorch ResNets, ViTs and SCE checkpoints <-> sce_jax.

Reading, the layouts (sce_jax, torchvision, timm, MoCo v3's, the authors') and validation are
`weights.py`'s (docs/SCE.md 4, 10); this module writes files and holds the command line.

Usage:
  python -m sce_jax.convert in  SRC OUT.safetensors [--config FILE[:ARG]] [--num_heads N]
      [--allow_pickle]
  python -m sce_jax.convert out SRC OUT.{safetensors,pth} [--which target]
      [--layout torchvision|timm|authors|mocov3] [--config FILE[:ARG]]
  python -m sce_jax.convert out --layout detectron2 SRC OUT.pkl
SRC: an sce_jax workdir / checkpoint dir, a .safetensors file (any layout), or a
.pth/.pt/.ckpt/.pth.tar file (needs PyTorch). `out` writes a ResNet trunk in torchvision's
layout and a ViT trunk in timm's unless --layout says otherwise; detectron2: the ResNet trunk
as the .pkl detectron2 loads for a pretrained backbone (MODEL.WEIGHTS; launch/detection/);
authors / mocov3: the whole model (trunks and heads) as the authors' or MoCo v3's checkpoint.
"""
import argparse
import json
import pathlib
import pickle
import sys

import flax.traverse_util
import ml_collections
import numpy as np

from sce_jax import config as sce_config
from sce_jax import logs, weights, workdir
from sce_jax.models import trunks
from sce_jax.weights import NETS


def save_safetensors(variables, path, metadata=None):
  """sce_jax variables -> safetensors with '/'-joined keys (`params/trunk/conv1/kernel`)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          flax.traverse_util.flatten_dict(variables, sep="/").items()}
  safetensors.numpy.save_file(flat, path, metadata={"format": "sce_jax", **(metadata or {})})


def save_torch(state_dict, path, layout="torchvision"):
  """A torch-layout state dict -> .safetensors, or .pth/.pt (needs torch). The authors' layout
  and MoCo v3's are wrapped in {'state_dict': ...}, as a Lightning checkpoint and
  moco-v3's main_moco.py save theirs."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    safetensors.numpy.save_file(state_dict, path)
    return
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"writing {path.suffix} needs PyTorch: pip install torch, or write "
                      ".safetensors.") from e
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  torch.save({"state_dict": tensors} if layout in ("authors", "mocov3") else tensors, path)


def save_detectron2(state_dict, path):
  """A detectron2-layout state dict -> the .pkl detectron2's checkpointer reads as is: numpy
  arrays under 'model', '__author__' set, 'matching_heuristics' letting it match the names to
  its backbone (as MoCo's convert-pretrain-to-detectron2.py writes)."""
  with open(path, "wb") as f:
    pickle.dump({"model": state_dict, "__author__": "sce_jax", "matching_heuristics": True}, f)


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m sce_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("direction", choices=("in", "out"),
                      help="in: to sce_jax safetensors; out: to a torch layout")
  parser.add_argument("src", help="workdir / checkpoint dir, .safetensors, .pth/.pt/.ckpt")
  parser.add_argument("dst", help="in: .safetensors; out: .safetensors or .pth/.pt")
  parser.add_argument("--config", help="FILE[:ARG] to validate against (default: inferred)")
  parser.add_argument("--which", choices=tuple(NETS), default="online",
                      help="out, torchvision layout: which trunk to export")
  parser.add_argument("--layout", choices=weights.EXPORT_LAYOUTS,
                      help="out: torchvision (a ResNet trunk; default), timm (a ViT trunk; "
                      "default), detectron2 (a ResNet trunk, .pkl) or authors (all networks)")
  parser.add_argument("--num_heads", type=int, default=0,
                      help="a ViT's attention heads, which its weights do not hold (default: "
                      "width / 64; MoCo v3's ViT-S has 12); without --config")
  parser.add_argument("--allow_pickle", action="store_true",
                      help="let torch.load unpickle objects (Lightning .ckpt); trusted files only")
  args = parser.parse_args(argv)
  logs.quiet()
  if args.direction == "in" and not args.dst.endswith(".safetensors"):
    parser.error("in: DST must be a .safetensors file")
  if args.direction == "out" and args.layout == "detectron2" and not args.dst.endswith(".pkl"):
    parser.error("out --layout detectron2: DST must be a .pkl file")
  try:
    _convert(args)
  except (ValueError, OSError, ImportError) as e:  # ConfigError is a ValueError.
    print(f"Error: {e}", file=sys.stderr)  # One line, as sce_jax.main's.
    return 1
  return 0


def _workdir_model(src):
  """config.model of the sce_jax workdir that `src` (the workdir, its checkpoints/ or a step
  directory) belongs to, from its config.json; None if there is none."""
  path = pathlib.Path(src)
  for folder in [path, *path.parents][:4] if path.is_dir() else []:
    if (folder / workdir.CONFIG).is_file():
      return ml_collections.ConfigDict(json.loads((folder / workdir.CONFIG).read_text())["model"])
  return None


def _convert(args):
  variables, layout = weights.read(args.src, args.allow_pickle)
  model_cfg = (sce_config.load(args.config).model if args.config else _workdir_model(args.src))
  inferred = model_cfg is None
  if inferred:
    model_cfg = weights.infer_model_config(variables, args.num_heads)
  weights.check_variables(variables, model_cfg, source=args.src, layout=layout)
  trunk = weights.describe_trunk(model_cfg)
  if inferred and trunks.family(model_cfg).UNINFERRED and not args.num_heads:
    trunk += f" ({trunks.family(model_cfg).UNINFERRED})"
  if args.direction == "in":
    save_safetensors(variables, args.dst, {"source": str(args.src), "trunk": trunk})
  elif args.layout == "detectron2":  # weights.to_torch refuses a trunk of another layout
    save_detectron2(weights.to_torch(variables, "detectron2", args.which), args.dst)
  else:
    out_layout = args.layout or trunks.family(model_cfg).TORCH_LAYOUT
    save_torch(weights.to_torch(variables, out_layout, args.which), args.dst, out_layout)
  print(f"{args.src} ({layout}; {weights.describe(variables)}; {trunk}) -> {args.dst}")


if __name__ == "__main__":
  sys.exit(main())

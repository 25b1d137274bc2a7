"""Weights: reading, the torch layouts, validation against a model config, `load_trunk`.

Model-free (docs/SCE.md 4, 10): evaluation reads trunks here, and `convert.py` (the command line
and the writers) converts through it. These layouts, one name mapping (`_PARTS`,
`_TRUNK_PREFIXES`, `_LEAVES`, `_mlp_stride` below):

* sce_jax: nested dicts under the TrainState field names `params`, `batch_stats`,
  `target_params`, `target_batch_stats`, each holding `trunk`, `projector`, `predictor`,
  `probe`. Stored as an orbax checkpoint (training) or as safetensors with '/'-joined keys
  (`params/trunk/conv1/kernel`), which is what `python -m sce_jax.convert in` writes.
* torchvision: a ResNet state dict (`conv1.weight`, `layer1.0.downsample.1.running_var`),
  trunk only; `fc.*` is dropped on import and `num_batches_tracked` is written as 0 on export.
* timm: a ViT state dict (`patch_embed.proj.weight`, `cls_token`, `pos_embed`,
  `blocks.N.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`, `norm`), DeiT's, DINO's and the
  MoCo v3 ViTs' layout, trunk only; a classifier `head.*` is dropped on import.
* mocov3: MoCo v3's training checkpoint, a timm ViT (or torchvision ResNet) under
  `base_encoder.` (online) and `momentum_encoder.` (target); its heads (`*.head.*`, `*.fc.*`,
  `predictor.*`) are dropped on import. Export writes the whole model as moco/builder.py names
  it under DDP's `module.`: the projectors as the encoders' `fc` (ResNet) or `head` (ViT), the
  predictor, each an nn.Sequential of (Linear, BatchNorm1d, ReLU) groups (the method
  `moco_v3`'s heads, docs/SCE.md 12); moco-v3's main_lincls.py reads its trunk.
* detectron2 (export only): a ResNet trunk as detectron2 loads a pretrained backbone, the
  renaming of MoCo's `detection/convert-pretrain-to-detectron2.py` applied to torchvision's
  names (`detectron2_key`): `stem.conv1`, `res2`..`res5` for `layer1`..`layer4`, a BatchNorm as
  its convolution's `.norm`, `shortcut` for `downsample`.
* authors: the state dict of eztorch's / CEA-LIST/SCE's Lightning SCEModel: `trunk.`,
  `projector.layers.{k}.`, `predictor.layers.{k}.`, `momentum_trunk.`, `momentum_projector.`
  (MLPHead is an nn.Sequential of (Linear, BatchNorm1d, activation) groups, or of (Linear,
  activation) without BatchNorm, the ViT heads). Its other buffers (`queue`, `queue_ptr`) are
  not weights and are skipped.

Conv kernels are HWIO in Flax and OIHW in torch, Dense kernels (in, out) and Linear weights
(out, in); the ResNet modules use symmetric padding like torch, the ViT's patch projection is a
valid-padded convolution like timm's, so the numbers carry over as is. The number of attention
heads of a ViT is not in its weights: `infer_model_config` takes it as an argument (default:
width / 64, the ViT-Ti/S/B table; MoCo v3's ViT-S has 12, DINO's 6). What a trunk's shapes say
(its depth, width, stem or patch) each trunk family reads itself (models/trunks.py).
"""
import functools
import json
import pathlib
import pickle
import re
from typing import Any, Mapping

from absl import logging
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sce_jax import checkpoint
from sce_jax.models import sce, trunks

COLLECTIONS = ("params", "batch_stats", "target_params", "target_batch_stats")
# Each network's (params, batch_stats) collections.
NETS = {"online": ("params", "batch_stats"), "target": ("target_params", "target_batch_stats")}
# sce_jax (network, part) <-> the authors' state-dict prefix.
_PARTS = {
    ("online", "trunk"): "trunk.",
    ("online", "projector"): "projector.",
    ("online", "predictor"): "predictor.",
    ("target", "trunk"): "momentum_trunk.",
    ("target", "projector"): "momentum_projector.",
}
# (collection, Flax leaf, torch leaf). Torch's `weight` is a kernel when ndim > 1, else a scale.
_LEAVES = (
    ("params", "kernel", "weight"),
    ("params", "scale", "weight"),
    ("params", "bias", "bias"),
    ("batch_stats", "mean", "running_mean"),
    ("batch_stats", "var", "running_var"),
)
_TO_TORCH_LEAF = {(c, f): t for c, f, t in _LEAVES}
# Trunk-only layouts: each network's trunk prefix; keys starting with _HEADS after it are not
# the trunk (torchvision's and timm's classifiers, MoCo v3's projector) and are dropped.
_BARE = trunks.TORCH_LAYOUTS  # a trunk alone, its keys without a prefix: each family's layout
# MoCo v3's (network, part) prefixes (moco/builder.py); {head}: the family's TORCH_HEAD.
_MOCOV3 = {("online", "trunk"): "base_encoder.", ("target", "trunk"): "momentum_encoder.",
           ("online", "projector"): "base_encoder.{head}.",
           ("target", "projector"): "momentum_encoder.{head}.",
           ("online", "predictor"): "predictor."}
_TRUNK_PREFIXES = {
    **{layout: {("online", "trunk"): ""} for layout in _BARE},
    "mocov3": {k: v for k, v in _MOCOV3.items() if k[1] == "trunk"},
}
_HEADS = tuple(f"{head}." for head in trunks.TORCH_HEADS)
# What `to_torch` writes: a trunk alone, or a whole model (the authors', MoCo v3's).
EXPORT_LAYOUTS = (*_BARE, "detectron2", "authors", "mocov3")
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".tar", ".bin")


# ---------------------------------------------------------------------------------------------
# Names.


def _mlp_stride(has_bn):
  """Sequential entries per MLP layer: (Linear, BatchNorm1d, activation), or (Linear,
  activation) in a head without BatchNorm."""
  return 3 if has_bn else 2


def _torch_module(path, stride=None):
  """('layer1_0', 'downsample_1') -> 'layer1.0.downsample.1', ('blocks_3', 'attn', 'qkv') ->
  'blocks.3.attn.qkv'; an MLP's (stride: its `_mlp_stride`) ('bn1',) -> 'layers.4'."""
  if stride is None:
    return ".".join(re.sub(r"_(\d+)$", r".\1", name) for name in path)
  (name,) = path
  m = re.fullmatch(r"(linear|bn)(\d+)", name)
  if not m:
    return name
  return f"layers.{stride * int(m[2]) + (m[1] == 'bn')}"


def _flax_module(name, stride=None):
  """The inverse of `_torch_module`; names it cannot map are kept (and flagged by checks)."""
  if stride is None:
    return tuple(re.sub(r"\.(\d+)", r"_\1", name).split(".")) if name else ()
  m = re.fullmatch(r"layers\.(\d+)", name)
  kind = m and {0: "linear", 1: "bn"}.get(int(m[1]) % stride)
  return (f"{kind}{int(m[1]) // stride}",) if kind else (name,)


def torch_key(collection, path, layout="authors", stride=3):
  """The torch name of a Flax leaf: ('params', ('trunk', 'bn1', 'scale')) -> 'trunk.bn1.weight'.

  The trunk-only layouts (torchvision, timm, mocov3) name trunk leaves with their own prefix;
  stride: the `_mlp_stride` of the MLP the leaf is in.
  """
  net = "target" if collection.startswith("target_") else "online"
  kind = collection.removeprefix("target_")
  part, *module, leaf = path
  prefix = "" if layout in _BARE else _TRUNK_PREFIXES.get(layout, _PARTS).get(
      (net, part), f"{net}.{part}.")
  leaf = _TO_TORCH_LEAF.get((kind, leaf), leaf)
  module = _torch_module(tuple(module), None if part == "trunk" else stride)
  return f"{prefix}{module}.{leaf}" if module else f"{prefix}{leaf}"


def _to_torch_array(leaf, x):
  x = np.asarray(x)
  if leaf == "kernel":
    x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
  return np.ascontiguousarray(x)


def _from_torch_leaf(leaf, x):
  """torch leaf name and array -> (collection kind, Flax leaf, array in Flax layout)."""
  if leaf == "weight" and x.ndim > 1:
    return "params", "kernel", np.ascontiguousarray(
        x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T)
  for kind, flax_leaf, torch_leaf in _LEAVES:
    if torch_leaf == leaf and flax_leaf != "kernel":
      return kind, flax_leaf, x
  return "params", leaf, x  # unknown: kept so that a check reports it by name


def _nested(flat):
  return flax.traverse_util.unflatten_dict(flat)


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree) if tree else {}


# ---------------------------------------------------------------------------------------------
# Torch layouts <-> sce_jax variables.


def _unwrap(state_dict):
  """Lightning's {'state_dict': ...} (nested or flattened to 'state_dict.'), DDP's 'module.'."""
  if isinstance(state_dict.get("state_dict"), Mapping):
    state_dict = state_dict["state_dict"]
  for prefix, need_all in (("state_dict.", False), ("state_dict/", False), ("module.", True)):
    hits = [k.startswith(prefix) for k in state_dict]
    if hits and (all(hits) if need_all else any(hits)):
      state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return state_dict


def torch_layout(state_dict) -> str:
  """'mocov3' (`base_encoder.` keys), 'authors' (SCE-model prefixes), else the trunk family's
  layout ('timm': a ViT's `cls_token`; 'torchvision')."""
  if any(k.startswith(_TRUNK_PREFIXES["mocov3"][("online", "trunk")]) for k in state_dict):
    return "mocov3"
  if any(k.startswith(tuple(_PARTS.values())) for k in state_dict):
    return "authors"
  return trunks.of_weights(state_dict).TORCH_LAYOUT


def from_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """A torchvision, timm, MoCo v3 or authors' state dict (numpy arrays) -> sce_jax variables.

  No model config is needed: names map one to one. Use `check_variables` to validate.
  """
  state_dict = _unwrap(dict(state_dict))
  layout = torch_layout(state_dict)
  parts = _TRUNK_PREFIXES.get(layout, _PARTS)
  has_bn = {p: any(k.startswith(p) and k.endswith(".running_mean") for k in state_dict)
            for p in parts.values()}
  flat, skipped = {}, []
  for key, x in state_dict.items():
    match = [(net_part, p) for net_part, p in parts.items() if key.startswith(p)]
    if not match or (layout in _TRUNK_PREFIXES and key[len(match[0][1]):].startswith(_HEADS)):
      skipped.append(key)  # classifiers, MoCo v3's heads, the authors' queue buffers.
      continue
    (net, part), prefix = match[0]
    module, _, leaf = key[len(prefix):].rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    kind, flax_leaf, x = _from_torch_leaf(leaf, np.asarray(x))
    if np.issubdtype(x.dtype, np.floating):
      x = x.astype(np.float32)
    collection = NETS[net][kind == "batch_stats"]
    stride = None if part == "trunk" else _mlp_stride(has_bn[prefix])
    flat[(collection, part) + _flax_module(module, stride) + (flax_leaf,)] = x
  if skipped:
    logging.info("Skipped %d keys outside the networks: %s", len(skipped), skipped[:8])
  return _nested(flat)


def _strides(variables):
  """{(net, part): `_mlp_stride`} of the MLPs in `variables`: with BatchNorm or without."""
  return {(net, part): _mlp_stride(any(
      re.fullmatch(r"bn\d+", m) for c in collections for m in variables.get(c, {}).get(part, {})))
          for net, collections in NETS.items() for part in ("projector", "predictor")}


def detectron2_key(key) -> str:
  """A torchvision ResNet key -> detectron2's: 'layer1.0.bn2.weight' -> 'res2.0.conv2.norm.weight',
  'bn1.running_var' -> 'stem.conv1.norm.running_var', 'layer2.0.downsample.1.bias' ->
  'res3.0.shortcut.norm.bias' (MoCo's convert-pretrain-to-detectron2.py)."""
  key = key if key.startswith("layer") else f"stem.{key}"
  key = re.sub(r"layer(\d)", lambda m: f"res{int(m[1]) + 1}", key)
  key = re.sub(r"bn(\d)", r"conv\1.norm", key)
  return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_torch(variables, layout="torchvision", which="online") -> dict[str, np.ndarray]:
  """sce_jax variables -> a torch-layout state dict of numpy arrays.

  torchvision (a ResNet), timm (a ViT), detectron2 (a ResNet, without BatchNorm update
  counts): the `which` ('online' or 'target') trunk. authors, mocov3: every network part
  present (the authors' keys renamed: their MLPs' `layers.N` are MoCo v3's entries N too).
  """
  if layout == "mocov3":
    head = trunks.of_weights(variables.get("params", {}).get("trunk", {})).TORCH_HEAD
    renames = {_PARTS[part] + ("" if part[1] == "trunk" else "layers."): prefix.format(head=head)
               for part, prefix in _MOCOV3.items()}
    out = {}
    for key, x in to_torch(variables, "authors").items():
      old = next(p for p in renames if key.startswith(p))
      out[f"module.{renames[old]}{key[len(old):]}"] = x
    return out
  if layout == "detectron2":
    family = trunks.of_weights(variables.get(NETS[which][0], {}).get("trunk", {}))
    if family.TORCH_LAYOUT != "torchvision":
      raise ValueError("the detectron2 layout holds a torchvision-layout (ResNet) trunk; this "
                       f"one is a {family.NAME}.")
    return {detectron2_key(k): v for k, v in to_torch(variables, "torchvision", which).items()
            if not k.endswith("num_batches_tracked")}
  if layout in _BARE:
    collections = NETS[which]
    if "trunk" not in variables.get(collections[0], {}):
      raise ValueError(f"No {which} trunk to export; found {describe(variables)}.")
    parts = {(which, "trunk")}
  elif layout == "authors":
    collections, parts = COLLECTIONS, set(_PARTS)
  else:
    raise ValueError(f"layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
  out, strides = {}, _strides(variables)
  for collection in collections:
    net = "target" if collection.startswith("target_") else "online"
    for path, x in _flat(variables.get(collection)).items():
      if (net, path[0]) not in parts:
        continue
      key = torch_key(collection, path, layout, strides.get((net, path[0])))
      out[key] = _to_torch_array(path[-1], x)
      if path[-1] == "mean":  # a BatchNorm: torch also stores its update count.
        out[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def describe(variables) -> str:
  """'online trunk, projector; target trunk', for messages."""
  nets = []
  for net, (collection, _) in NETS.items():
    if variables.get(collection):
      nets.append(f"{net} {', '.join(sorted(variables[collection]))}")
  return "; ".join(nets) or "no networks"


# ---------------------------------------------------------------------------------------------
# Reading and writing files.


def _torch_load(path, allow_pickle):
  """A torch file's state dict as numpy arrays. Torch is imported here only."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {pathlib.Path(path).suffix} needs PyTorch: pip install torch, or convert to "
        f"safetensors (python -m sce_jax.convert in {path} OUT.safetensors, where torch is "
        "installed).") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"{path} holds Python objects besides tensors (a Lightning checkpoint's hyper-parameters, "
        "say), which torch.load(weights_only=True) refuses. If you trust the file, pass "
        "allow_pickle=True (--allow_pickle).") from e
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  state_dict = _unwrap(obj)
  return {k: (v.detach().cpu().float() if v.is_floating_point() else v.cpu()).numpy()
          for k, v in state_dict.items() if torch.is_tensor(v)}


def _read_orbax(path, only=None):
  """The weight collections of a TrainState checkpoint as numpy, skipping the optimiser state
  and the queue; `only` = (net, part), e.g. ('online', 'trunk'), restores just that."""

  def select(metadata):
    wanted = {k: metadata[k] for k in COLLECTIONS if k in metadata and metadata[k]}
    if only is not None:
      net, part = only
      wanted = {k: {part: v[part]} for k, v in wanted.items() if k in NETS[net] and part in v}
    if not wanted:
      raise ValueError(f"{path} holds none of {COLLECTIONS}; found {sorted(metadata)}.")
    return wanted

  return checkpoint.read_numpy(path, select)


def read(path, allow_pickle=False, only=None):
  """Any supported checkpoint -> (sce_jax variables as numpy, without validation; the source's
  layout: 'sce_jax' | 'torchvision' | 'authors'). `only` = (net, part) lets an orbax read skip
  the rest."""
  path = pathlib.Path(path)
  if path.is_dir():
    return _read_orbax(path, only), "sce_jax"
  if not path.exists():
    raise FileNotFoundError(f"No such checkpoint: {path}")
  if path.suffix == ".safetensors":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    try:
      flat = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError) as e:
      raise ValueError(f"{path} is not a readable safetensors file ({e}); convert or copy it "
                       "again.") from e
    if flat and all(k.split("/")[0] in COLLECTIONS for k in flat):
      return flax.traverse_util.unflatten_dict(flat, sep="/"), "sce_jax"
    state_dict = _unwrap(flat)
  elif path.suffix in _TORCH_SUFFIXES:
    state_dict = _torch_load(path, allow_pickle)
  else:
    raise ValueError(f"Unknown checkpoint type {path}: expected a directory (orbax), "
                     f".safetensors, or one of {_TORCH_SUFFIXES}.")
  return from_torch(state_dict), torch_layout(state_dict)


# ---------------------------------------------------------------------------------------------
# Validation against a model config.


def _mlp_config(params, stats):
  """An MLP's config from its parameters and statistics."""
  if not params:  # a stand-in, never compared: only parts present in a file are checked.
    return dict(hidden_dim=1, out_dim=1, num_layers=1, last_bn=False, last_bias=False)
  n = sum(bool(re.fullmatch(r"linear\d+", k)) for k in params)
  last = params.get(f"linear{n - 1}", {})
  out_dim = last["kernel"].shape[1] if "kernel" in last else 0
  hidden = params["linear0"]["kernel"].shape[1] if n > 1 and "kernel" in params.get(
      "linear0", {}) else out_dim
  # Without BatchNorm the hidden layers have biases: eztorch's ViT heads, whose GELU leaves no
  # trace in the weights.
  norm = "none" if n > 1 and "bias" in params.get("linear0", {}) else "batch"
  return dict(hidden_dim=hidden, out_dim=out_dim, num_layers=n,
              last_bn=f"bn{n - 1}" in (stats or {}), last_bias="bias" in last, norm=norm,
              activation="gelu" if norm == "none" else "relu")


def describe_trunk(model_cfg):
  """The trunk a config builds, for messages: 'vit_small (width 384, 12 blocks, 6 heads, patch
  16)', 'resnet50 (Bottleneck blocks (3, 4, 6, 3)), width 64, small_stem=False'."""
  return trunks.family(model_cfg).describe(model_cfg)


def infer_model_config(variables, num_heads=0) -> ml_collections.ConfigDict:
  """The config.model that a checkpoint's shapes imply (its depth, width, stem, heads).

  A ViT's attention heads are not in its weights: num_heads, or 0 for width / 64 (the
  ViT-Ti/S/B table). Its pooling is taken to be the class token (timm, DINO, MoCo v3).
  """
  net = "online" if variables.get("params", {}).get("trunk") else "target"
  params, stats = (variables.get(c, {}) for c in NETS[net])
  if "trunk" not in params:
    raise ValueError(f"No trunk in the checkpoint; found {describe(variables)}.")
  trunk = params["trunk"]
  cfg = ml_collections.ConfigDict(dict(
      trunk="", width=0, small_stem=False, dtype="float32", depth=0, num_heads=0,
      patch_size=16, pos_embed="learned", pool="cls", drop_path=0.0, freeze_patch_embed=False,
      projector=_mlp_config(params.get("projector"), stats.get("projector")),
      predictor=(_mlp_config(params["predictor"], stats.get("predictor"))
                 if params.get("predictor") else dict(_mlp_config({}, {}), num_layers=0))))
  cfg.update(trunks.of_weights(trunk).infer_config(trunk, num_heads))
  return cfg


@functools.lru_cache(maxsize=16)
def _model_shapes(model_json, net, num_classes):
  """Leaf shapes of SCENet's variables: {(collection kind, *path): shape}."""
  cfg = ml_collections.ConfigDict(json.loads(model_json))
  model = sce.SCENet(cfg, with_predictor=net == "online", num_classes=num_classes)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes).items()}


def _trunk_problems(trunk, model_cfg, net, source):
  """The trunk's family and size against the config's (its family's `check_weights`): an error
  naming both, or problem lines."""
  family, found = trunks.family(model_cfg), trunks.of_weights(trunk)
  if found is not family:
    raise ValueError(f"{source}: its {net} trunk is {found.describe_weights(trunk)}, but the "
                     f"config asks for {describe_trunk(model_cfg)}.")
  try:
    return family.check_weights(trunk, model_cfg, net)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def check_variables(variables, model_cfg, parts=None, source="checkpoint", layout="sce_jax"):
  """Raises ValueError unless the networks in `variables` fit `model_cfg` key for key
  (`mismatches`), listing the first dozen problems."""
  model_cfg = getattr(model_cfg, "model", model_cfg)
  problems = mismatches(variables, model_cfg, parts, source, layout)
  if problems:
    shown = problems[:12] + ([f"and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise ValueError(f"{source} does not match the model config ({describe_trunk(model_cfg)}): "
                     + "; ".join(shown))


def mismatches(variables, model_cfg, parts=None, source="checkpoint", layout="sce_jax"):
  """The problems of the networks in `variables` against `model_cfg`, one line each; a
  ValueError (one line) for a trunk of another kind or depth.

  parts: the (net, part) pairs to check (default: all present). Problems name each key in the
  source's own layout (torch names and shapes for torch files), plus the sce_jax path. A ViT's
  position table may be laid out for any square grid (it is resampled to the images').
  """
  model_cfg = getattr(model_cfg, "model", model_cfg)
  if parts is None:
    parts = [(net, p) for net, (c, _) in NETS.items() for p in variables.get(c, {})]
  problems = []
  for net, part in parts:
    params = variables.get(NETS[net][0], {})
    if part == "trunk":
      problems += _trunk_problems(params.get("trunk", {}), model_cfg, net, source)
    probe = variables.get("params", {}).get("probe", {}).get("kernel")
    classes = int(probe.shape[1]) if net == "online" and probe is not None else 0
    expected = _model_shapes(model_cfg.to_json() if hasattr(model_cfg, "to_json")
                             else json.dumps(model_cfg), net, classes)
    expected = {k: v for k, v in expected.items() if k[1] == part}
    got = {}
    for kind, collection in zip(("params", "batch_stats"), NETS[net]):
      tree = variables.get(collection, {}).get(part)
      got.update({(kind, part) + k: np.shape(v) for k, v in _flat(tree).items()})
    # A ViT's position table fits with rows for any square grid: vit.py resamples it.
    pos = ("params", "trunk", "pos_embed")
    if pos in got and pos in expected and len(got[pos]) == 3 and (
        got[pos][::2] == expected[pos][::2] and round((got[pos][1] - 1) ** 0.5) ** 2 + 1 ==
        got[pos][1]):
      got[pos] = expected[pos]
    problems += _compare(got, expected, net, layout)
  return problems


def _compare(got, expected, net, layout):
  """Problem lines for missing / unexpected / mis-shaped leaves of one network part."""
  stride = _mlp_stride(any(re.fullmatch(r"bn\d+", k[2]) for k in (*got, *expected)))

  def name(k):
    collection = ("target_" if net == "target" else "") + k[0]
    flax_name = "/".join((collection,) + k[1:])
    if layout == "sce_jax":
      return flax_name
    return f"{torch_key(collection, k[1:], layout, stride)} (sce_jax {flax_name})"

  def shape(k, s):  # torch files are reported in torch's layout.
    if layout == "sce_jax" or k[-1] != "kernel":
      return tuple(s)
    return tuple(s[i] for i in (3, 2, 0, 1)) if len(s) == 4 else tuple(s[::-1])

  lines = [f"missing key {name(k)}, shape {shape(k, s)}" for k, s in expected.items()
           if k not in got]
  lines += [f"unexpected key {name(k)}, shape {shape(k, s)}" for k, s in got.items()
            if k not in expected]
  lines += [f"shape mismatch at {name(k)}: checkpoint {shape(k, s)}, config "
            f"{shape(k, expected[k])}" for k, s in got.items()
            if k in expected and tuple(s) != tuple(expected[k])]
  return lines


def load_trunk(path, model_cfg, which="online", allow_pickle=False) -> dict[str, Any]:
  """A validated trunk for `models.make_trunk(model_cfg)`: {'params', 'batch_stats'} (numpy).

  path: an sce_jax workdir or checkpoint dir (orbax), an sce_jax .safetensors, or a
  torchvision / authors' .safetensors, .pth, .pt or .ckpt (the last three need torch).
  which: 'online' or 'target' (the authors' `momentum_trunk`).
  allow_pickle: let torch.load unpickle arbitrary objects (Lightning .ckpt); trusted files only.
  """
  params_c, stats_c = NETS[which]
  variables, layout = read(path, allow_pickle, only=(which, "trunk"))
  if "trunk" not in variables.get(params_c, {}):
    raise ValueError(f"{path} has no {which} trunk; it holds {describe(variables)}.")
  check_variables(variables, model_cfg, [(which, "trunk")], source=str(path), layout=layout)
  return {"params": variables[params_c]["trunk"],
          "batch_stats": variables.get(stats_c, {}).get("trunk", {})}

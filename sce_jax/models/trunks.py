"""Trunk families: config.model.trunk -> the module that owns everything of its family.

A family is a module of models/ (`resnet.py`, `vit.py`) that defines, at its end:
  NAME, MODULE (its Flax module class), HAS_BATCH_STATS (shuffle-BN needs them), TORCH_LAYOUT (weights.py), MARK (a top-level
  name of its weights), TORCH_HEAD (torch's name of its classifier, weights.py), NO_DECAY
  (optim.py), EVAL_KEYS (model keys an evaluation records), TINY (a CPU stand-in for
  benchmarks), ARCHS (its model.trunk values), UNINFERRED (what infer_config cannot read from
  weights);
  build(model_cfg, bn_splits, module, remat_blocks), feature_width(model_cfg), frozen(model_cfg) (parameters that
  never train), config_problem(model_cfg, crop_sizes) (schema.py), describe(model_cfg);
  describe_weights(trunk_params), check_weights(trunk_params, model_cfg, net),
  infer_config(trunk_params, num_heads) (weights.py, convert.py).
Nothing outside the families asks which family a trunk is; adding one is a module and a line
of FAMILIES.
"""
import flax.linen as nn

from sce_jax.models import resnet, vit

FAMILIES = (resnet, vit)
# model.remat: what the backward pass recomputes instead of keeping (jax.checkpoint, docs/SCE.md
# 11): nothing; each residual / transformer block (only the blocks' inputs are kept); the whole
# trunk (only its input is kept; a second forward pass of the trunk in the backward pass).
# Nothing inside a block is saved (no policy): the goal is memory, and a ResNet's convolutions
# are not the dot products JAX's save policies name.
REMATS = ("none", "block", "full")
# model.trunk values.
TRUNKS = tuple(name for f in FAMILIES for name in f.ARCHS)
# Parameters without weight decay besides norms and biases, of any family (optim.py).
NO_DECAY = tuple(name for f in FAMILIES for name in f.NO_DECAY)
# The trunk-only torch layouts (weights.py).
TORCH_LAYOUTS = tuple(f.TORCH_LAYOUT for f in FAMILIES)
# Torch's names of the families' classifiers (MoCo v3's projectors), dropped on import (weights.py).
TORCH_HEADS = tuple(f.TORCH_HEAD for f in FAMILIES)


def family(model_cfg):
  """The family module of config.model.trunk."""
  return next(f for f in FAMILIES if model_cfg.trunk in f.ARCHS)


def of_weights(names):
  """The family of a trunk's weights, from their top-level names (Flax modules, or torch keys'
  first part): the one whose MARK is among them; weights without a mark are taken for a
  ResNet's, whose checks then name what is missing."""
  tops = {name.split(".")[0] for name in names}
  return next((f for f in FAMILIES if f.MARK in tops), resnet)


def make_trunk(model_cfg, bn_splits=0):
  """The trunk of config.model; SCENet and the evaluation build it here, so that a
  TrainState's trunk variables fit both. bn_splits > 0: BatchNorm statistics of that many
  groups of the batch, the same variables (families with batch statistics only). model.remat
  (REMATS) wraps each block or the whole trunk in `nn.remat`: the same variables, values and
  gradients, less memory for another forward pass."""
  f, remat = family(model_cfg), model_cfg.get("remat", "none")
  # static_argnums counts `self`: `train` (2) is a Python bool.
  module = nn.remat(f.MODULE, static_argnums=(2,)) if remat == "full" else f.MODULE
  return f.build(model_cfg, bn_splits, module=module, remat_blocks=remat == "block")


def feature_dim(model_cfg) -> int:
  """The width of the trunk's features (what evaluation and the probe read)."""
  return family(model_cfg).feature_width(model_cfg)

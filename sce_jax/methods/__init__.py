"""The self-supervised methods, one module each (docs/SCE.md 1-3 for SCE, "Other methods" for
the rest): name -> module.

A method module owns what differs between methods, for the one training step of
`train_step.py` to call:
  EMA_TARGET      True: a target network (trunk + projector) follows the online one by EMA;
                  False: the online network also embeds the target views, with gradients.
  RECIPES         setting -> {config key: value} (or a function of the config giving it) of
                  the method's published recipe in that setting ("cifar", "imagenet",
                  "cifar_vit", "imagenet_vit"), each value with its source; the config files
                  apply them with `apply_recipe`.
  pairs(config, num_views)  the (target view, online view) pairs of the loss (crop pairing).
  uses_queue(config)        whether the state holds a queue of target embeddings.
  make_loss(config, pairs)  local(qs, zs, queue, keys) -> (loss, metrics): the loss of this
                  device's rows inside `jax.shard_map` over the `data` axis (it gathers what
                  it needs from the other devices); the step averages both over the devices.
                  keys (`losses.BatchKeys`): the whole global batch's target embeddings and
                  each row's place in them, for in-batch negatives: with optim.accum_steps > 1
                  the rows are one micro-batch's, so a loss that gathered the target
                  embeddings itself would see only that micro-batch's. The loss is a mean over
                  rows, so that the micro-batches' mean is the batch's. A method without
                  EMA_TARGET (its loss needs every row's online embeddings with gradients)
                  cannot be accumulated (schema.validate).
Optional (DINO's; `embed`, `init_memory` and `make_targets` below give the defaults):
  embed(x)        a head's output (B, D) as the loss reads it; default: unit rows.
  init_memory(config)  the method's state kept in the queue's place (state.queue) when it has
                  no queue: DINO's centre.
  make_targets(config, steps_per_epoch)  targets(zs, memory, step) -> (zs, memory, metrics):
                  the target's embeddings as the loss reads them and the memory after the step,
                  on the global batch before the loss (DINO: centring and sharpening).
Adding a method is adding its module and its line below.
"""
from sce_jax import losses
from sce_jax.config import ConfigError
from sce_jax.methods import byol, dino, moco_v2, moco_v3, ressl, sce, simclr

METHODS = {
    "sce": sce,
    "moco_v2": moco_v2,
    "moco_v3": moco_v3,
    "simclr": simclr,
    "byol": byol,
    "ressl": ressl,
    "dino": dino,
}


def get(name):
  return METHODS[name]


def embed(method):
  """How `method`'s heads' outputs become its loss's inputs (its `embed`, else unit rows)."""
  return getattr(method, "embed", losses.l2_normalize)


def init_memory(method, config):
  """`method`'s state in the queue's place (its `init_memory`), or None."""
  return method.init_memory(config) if hasattr(method, "init_memory") else None


def make_targets(method, config, steps_per_epoch):
  """`method`'s targets(zs, memory, step) (its `make_targets`), or None: the target's
  embeddings go to the loss as they are."""
  make = getattr(method, "make_targets", None)
  return make and make(config, steps_per_epoch)


def settings(name):
  """The settings with a recipe of method `name`."""
  return tuple(METHODS[name].RECIPES)


def apply_recipe(c, name, setting):
  """Sets config `c` (a config file's, for `setting`) to method `name`'s recipe, over the
  file's SCE values and before its variants shrink it (smoke); config files call it with their
  `method` variant, which --config.method=NAME sets (cli.parse_flags). ConfigError, naming the
  combinations that exist, for an unknown method or one without a recipe for `setting`."""
  if name not in METHODS:
    raise ConfigError(f"method={name!r} is not a known method; set --config.method to one of "
                      f"{', '.join(map(repr, METHODS))}.")
  recipes = METHODS[name].RECIPES
  if setting not in recipes:
    have = [m for m, module in METHODS.items() if setting in module.RECIPES]
    raise ConfigError(f"method {name!r} has no recipe for this config file's setting, "
                      f"{setting} ({name} has {', '.join(recipes)}; {setting} has "
                      f"{', '.join(have)}); pick another --config.method or config file.")
  c.method = name
  recipe = recipes[setting]
  for key, value in (recipe(c) if callable(recipe) else recipe).items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value

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
  make_loss(config, pairs)  local(qs, zs, queue) -> (loss, metrics): the loss of this device's
                  rows inside `jax.shard_map` over the `data` axis (it gathers what it needs
                  from the other devices); the step averages both over the devices.
Adding a method is adding its module and its line below.
"""
from sce_jax.config import ConfigError
from sce_jax.methods import byol, moco_v2, moco_v3, ressl, sce, simclr

METHODS = {
    "sce": sce,
    "moco_v2": moco_v2,
    "moco_v3": moco_v3,
    "simclr": simclr,
    "byol": byol,
    "ressl": ressl,
}


def get(name):
  return METHODS[name]


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

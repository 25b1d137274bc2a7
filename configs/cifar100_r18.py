"""SCE on CIFAR-100 with ResNet-18: the CIFAR-10 recipe (docs/SCE.md 5) with CIFAR-100 statistics.

Data from TFDS ('cifar100' downloads without manual steps); a class-folder tree works too:
--config.data.source=folder --config.data.path=PATH. Variants: `smoke`, `epochs=N`.
--config.method=NAME trains another method with its CIFAR recipe (docs/SCE.md 12).
"""
from sce_jax import config as sce_config
from sce_jax import methods
from sce_jax.data import presets


def get_config(arg=None):
  arg = sce_config.parse_arg(arg, smoke=False, epochs=200, method="sce")
  c = sce_config.base()
  c.epochs = arg.epochs
  c.data.on_device = True  # when the train set fits (sce_jax/data/resident.py), else the host
  c.data.source = "tfds"
  c.data.name = "cifar100"
  c.data.mean = presets.CIFAR100_MEAN
  c.data.std = presets.CIFAR100_STD
  methods.apply_recipe(c, arg.method, "cifar")
  if arg.smoke:
    sce_config.smoke(c)
  c.lock()
  return c

"""SCE on CIFAR-10 with ResNet-18 (docs/SCE.md section 5, CIFAR-10 column).

Variants, after the file name and comma-separated: `smoke` (a tiny network for a few dozen
steps on the CPU), `epochs=N`, `continue` (from pretrained weights, --config.init.weights=PATH:
config.continued). E.g. --config=configs/cifar10_r18.py:smoke. --config.method=NAME trains
another method with its CIFAR recipe (sce_jax/methods/, docs/SCE.md 12).
"""
from sce_jax import config as sce_config
from sce_jax import methods


def get_config(arg=None):
  arg = sce_config.parse_arg(arg, smoke=False, epochs=200, method="sce", **{"continue": False})
  # base() is the CIFAR-10 column: batch 256, SGD momentum 0.9, wd 5e-4, base lr 0.06, warmup
  # 5 epochs, temp 0.1, temp_m 0.05, coeff 0.5, queue 4096, m0 0.99 constant; one forward pass
  # per view, shuffle-BN over 8 groups in the target (docs/SCE.md 2, 3). Linear evaluation, the
  # small-dataset protocol (docs/SCE.md 7): SGD momentum 0.9, lr 30 unscaled, wd 0, batch 256,
  # 100 epochs, lr x 0.1 at epochs 60 and 80.
  c = sce_config.base()
  c.epochs = arg.epochs
  c.data.on_device = True  # when the train set fits (sce_jax/data/resident.py), else the host
  methods.apply_recipe(c, arg.method, "cifar")
  if arg["continue"]:
    sce_config.continued(c)
  if arg.smoke:
    sce_config.smoke(c)
  c.lock()
  return c

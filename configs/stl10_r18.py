"""SCE on STL-10 with ResNet-18 at 96 pixels. Not a published setting: our choices.

Pretraining reads the 100k-image 'unlabelled' TFDS split; its labels are -1, so the online
probe and kNN monitoring are off. Evaluate with the labelled split: --mode=knn or linear
with --config.data.train_split=train (test split 'test'). Otherwise the CIFAR recipe of
docs/SCE.md 5 (batch 256, SGD, lr 0.06, wd 5e-4, temp_m 0.05, queue 4096, asymmetric weak/strong
views at 96 px) with the torchvision stem (7x7 stride 2 and max-pool, 96 -> 24 px), which
keeps the cost near CIFAR's, and the authors' STL-10 normalisation (docs/SCE.md 5).
Variants: `smoke`, `epochs=N`.
"""
from sce_jax import config as sce_config
from sce_jax.data import presets


def get_config(arg=None):
  arg = sce_config.parse_arg(arg, smoke=False, epochs=200)
  c = sce_config.base()
  c.epochs = arg.epochs
  c.model.small_stem = False
  c.probe.enabled = False
  c.data.source = "tfds"
  c.data.name = "stl10"
  c.data.train_split = "unlabelled"
  c.data.eval_split = "test"
  c.data.image_size = 96
  c.data.mean = presets.STL10_MEAN
  c.data.std = presets.STL10_STD
  if arg.smoke:
    sce_config.smoke(c)
  c.eval.knn.every_epochs = -1
  c.lock()
  return c

"""SCE on Tiny ImageNet (200 classes, 64 px) with ResNet-18. Not a published setting: ours.

The CIFAR recipe of docs/SCE.md 5 (batch 256, SGD, lr 0.06, wd 5e-4, temp_m 0.05, queue 4096,
asymmetric weak/strong views) at 64 px with the 3x3 stride-1 stem and ImageNet statistics.
Data: a class-folder tree (--config.data.path=PATH with train/<wnid>/*.JPEG and
val/<wnid>/*.JPEG; the official archive's val/ must first be sorted into class folders using
val_annotations.txt). Variants: `smoke`, `epochs=N`.
"""
from sce_jax import config as sce_config
from sce_jax.data import presets


def get_config(arg=None):
  arg = sce_config.parse_arg(arg, smoke=False, epochs=200)
  c = sce_config.base()
  c.epochs = arg.epochs
  c.data.name = "tiny_imagenet"
  c.data.eval_split = "val"
  c.data.image_size = 64
  c.data.mean = presets.IMAGENET_MEAN
  c.data.std = presets.IMAGENET_STD
  if arg.smoke:
    sce_config.smoke(c)
  c.lock()
  return c

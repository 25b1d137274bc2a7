"""SCE on CIFAR-10 with ResNet-18 (spec section 5, CIFAR-10 column).

Variants: `configs/cifar10_r18.py:smoke` trains a tiny network for a few dozen steps on the CPU.
"""
from sce_jax import config as sce_config


def get_config(arg=None):
  c = sce_config.base()
  # Spec 5, CIFAR-10: batch 256, SGD momentum 0.9, wd 5e-4, base lr 0.06, warmup 5 of 200
  # epochs, temp 0.1, temp_m 0.05, coeff 0.5, queue 4096, m0 0.99 constant.
  if arg == "smoke":
    c.batch_size = 32
    c.epochs = 2
    c.max_steps = 24
    c.model.width = 4
    c.model.dtype = "float32"
    c.model.projector.hidden_dim = 32
    c.model.projector.out_dim = 16
    c.sce.queue = 128
    c.eval.every_epochs = 0
    c.checkpoint.every_steps = 8
    c.log_every_steps = 4
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of cifar10_r18.py; known: smoke.")
  c.lock()
  return c

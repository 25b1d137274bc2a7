"""SCE on ImageNet with ResNet-50 (docs/SCE.md section 5, ImageNet columns).

Variants, after the file name and comma-separated: `epochs=N` (100, 200, 300 or 1000 are the
published runs; default 200) and `multicrop` (2 x 224 + 192, 160, 128, 96 crops, projector
hidden 4096), `continue` (from pretrained weights, --config.init.weights=PATH:
config.continued). E.g. --config=configs/imagenet_r50.py:multicrop,epochs=200.
Data: TFDS imagenet2012 (manual download; --config.data.data_dir=DIR). --config.method=NAME
trains another method with its ImageNet recipe (sce_jax/methods/, docs/SCE.md 12).
"""
from sce_jax import config as sce_config
from sce_jax import methods

# (base_lr, weight_decay) of the published 2-crop runs by epochs (docs/SCE.md 5); other epoch counts
# and the multi-crop run use the 200-epoch values.
PUBLISHED = {100: (0.6, 1e-6), 200: (0.3, 1e-6), 300: (0.3, 1e-6), 1000: (0.3, 1.5e-6)}


def get_config(arg=None):
  arg = sce_config.parse_arg(arg, multicrop=False, epochs=200, method="sce",
                            **{"continue": False})
  c = sce_config.base()
  c.batch_size = 4096
  c.epochs = arg.epochs

  c.model.trunk = "resnet50"
  c.model.small_stem = False
  c.model.dtype = "bfloat16"
  c.model.projector.hidden_dim = 4096 if arg.multicrop else 2048
  c.model.projector.out_dim = 256
  c.model.projector.num_layers = 3
  c.model.projector.last_bn = True
  c.model.projector.last_bias = False
  c.model.predictor.hidden_dim = 4096
  c.model.predictor.num_layers = 2

  c.sce.temp = 0.1
  c.sce.temp_m = 0.07
  c.sce.coeff = 0.5
  c.sce.queue = 65536
  c.sce.symmetric = True
  c.sce.num_global = 2
  c.sce.m0 = 0.99
  c.sce.m_schedule = "cosine"
  c.sce.target_bn_splits = 0  # synchronised BN over the global batch (docs/SCE.md 3)

  c.optim.name = "lars"
  c.optim.base_lr, c.optim.weight_decay = (
      PUBLISHED[200] if arg.multicrop else PUBLISHED.get(arg.epochs, PUBLISHED[200]))
  c.optim.warmup_epochs = 10

  sce_config.imagenet(c, arg.multicrop)

  # Spec 7, ImageNet protocol: SGD, lr 0.1 x batch / 256 (0.4 at batch 1024), cosine, 90 epochs.
  c.eval.linear.update(epochs=90, batch_size=1024, base_lr=0.1, scale_lr=True,
                       schedule="cosine")
  # SimCLR's semi-supervised fine-tuning (docs/SCE.md 9): ImageNet 1 % (TFDS
  # imagenet2012_subset/1pct), batch 4096 (lr 0.8), 60 epochs; 10 %: subset=10pct, epochs=30.
  # Transfer and VOC07 read 224-pixel crops (data.image_size), as ssl-transfer and PCL.
  c.eval.finetune.update(subset="1pct", batch_size=4096, epochs=60)
  methods.apply_recipe(c, arg.method, "imagenet")
  if arg["continue"]:
    sce_config.continued(c)
  c.lock()
  return c

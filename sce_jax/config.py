"""The configuration schema: every key a run can set, with the CIFAR-10 defaults.

Config files in configs/ start from `base()` and change values only; the dict is locked, so a
misspelt key (in a file or in a --config.key=value override) is an error, not a silent no-op.
Names follow spec section 5.
"""
import ml_collections

from sce_jax.data import presets


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256           # global batch, all devices and processes
  c.epochs = 200
  c.max_steps = -1             # > 0 stops early (smoke runs); schedules still use epochs

  c.model = ml_collections.ConfigDict()
  c.model.trunk = "resnet18"
  c.model.width = 64
  c.model.small_stem = True    # 3x3 stride-1 stem without max-pool for 32-pixel images
  c.model.dtype = "bfloat16"   # computation; parameters stay float32
  c.model.projector = ml_collections.ConfigDict(dict(
      hidden_dim=512, out_dim=128, num_layers=2, last_bn=False, last_bias=True))
  c.model.predictor = ml_collections.ConfigDict(dict(
      hidden_dim=4096, out_dim=c.model.projector.get_ref("out_dim"), num_layers=0,
      last_bn=False, last_bias=False))  # num_layers 0: no predictor (CIFAR)

  c.sce = ml_collections.ConfigDict()
  c.sce.temp = 0.1
  c.sce.temp_m = 0.05
  c.sce.coeff = 0.5
  c.sce.positive = "zero_logit"  # the authors' code; "exclude" is the paper's formula
  c.sce.queue = 4096
  c.sce.negatives = "queue"      # "queue" | "batch" (all devices' keys) | "both"
  c.sce.symmetric = False        # True: ImageNet crop pairing; False: CIFAR (target view 0)
  c.sce.num_global = 2
  c.sce.m0 = 0.99
  c.sce.m_schedule = "constant"  # or "cosine" (to 1)
  c.sce.target_init = "copy"     # or "random" (the authors' separate init)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"           # or "lars"
  c.optim.base_lr = 0.06         # per 256 images
  c.optim.weight_decay = 5e-4
  c.optim.momentum = 0.9
  c.optim.trust_coefficient = 1e-3
  c.optim.warmup_epochs = 5

  c.probe = ml_collections.ConfigDict(dict(enabled=True, lr=0.1))  # online linear probe

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder"       # "folder" | "tfds" | "memory"
  c.data.name = "cifar10"        # TFDS name
  c.data.path = ""               # class-folder tree or .tar/.tar.gz for source=folder
  c.data.eval_path = ""          # "" finds the test split beside path
  c.data.data_dir = ""           # TFDS data_dir ("" = TFDS default)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.views = "cifar"         # a preset of sce_jax/data/presets.py (spec 6)
  c.data.mean = presets.CIFAR10_MEAN
  c.data.std = presets.CIFAR10_STD
  c.data.loader = "auto"         # "auto" | "tf" | "grain"
  c.data.shuffle_buffer = 50_000
  c.data.num_workers = 0
  c.data.prefetch = 2
  c.data.cache = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
  c.eval.knn_k = 200
  c.eval.knn_temp = 0.1
  c.eval.every_epochs = 10       # kNN monitoring during pretraining; 0 = only at the end
  c.eval.linear = ml_collections.ConfigDict(dict(
      epochs=90, batch_size=256, base_lr=0.1, weight_decay=0.0, momentum=0.9))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
  c.log_every_steps = 50
  return c

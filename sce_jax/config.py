"""The configuration's keys and defaults: every key a run can set, with the CIFAR-10 defaults.

Config files in configs/ start from `base()` and change values only; the dict is locked, so a
misspelt key (in a file or in a --config.key=value override) is an error, not a silent no-op.
Names follow docs/SCE.md section 5. `load` reads a config file as the command line does,
`parse_arg` a config file's variant string. The ground floor: nothing of ours but the data
presets is imported, so reading a config loads no model, checkpointer or evaluator. What the
values may be (`ENUMS`, `RANGES`, `validate`) and `describe` (--config_help) are schema.py's,
above the modules that own each list.
"""
import importlib.util
import pathlib

import ml_collections

from sce_jax.data import presets

# eval.transfer.datasets' default: the TFDS sets of evaluators/transfer.py's PROTOCOLS
# (tests/test_transfer.py checks that they agree).
TRANSFER_DATASETS = ("food101,cifar10,cifar100,sun397,cars196,voc/2007,dtd,oxford_iiit_pet,"
                     "caltech101,oxford_flowers102")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256           # global batch, all devices and processes
  c.epochs = 200
  c.max_steps = -1             # > 0 stops early (smoke runs); schedules still use epochs
  # The self-supervised method (sce_jax/methods/): --config.method=NAME on a config file
  # switches to that method's recipe for the file's setting (README, "Methods").
  c.method = "sce"

  c.model = ml_collections.ConfigDict()
  c.model.trunk = "resnet18"   # models.TRUNKS: resnet18/34/50/101, vit_tiny/small/base/large
  c.model.width = 0            # 0: the trunk's (64 for ResNets; 192/384/768/1024 for ViT-Ti/S/B/L)
  c.model.small_stem = True    # 3x3 stride-1 stem without max-pool for 32-pixel images
  c.model.zero_init_residual = False  # ResNets: each block's last BN scale starts at 0 (MoCo v3)
  c.model.dtype = "bfloat16"   # computation; parameters stay float32
  # bfloat16/float16 layers compute and sum their weight gradients in float32, as the authors'
  # AMP (models/precision.py, docs/SCE.md 5); False: plain Flax (bf16 gradient sums), to compare.
  c.model.f32_weight_grads = True
  # Rematerialisation (models/trunks.py REMATS): "block" recomputes each residual / transformer block's
  # activations in the backward pass, "full" the whole trunk's: less memory, more FLOPs.
  c.model.remat = "none"
  # ViT trunks (docs/SCE.md 10); ResNets ignore these.
  c.model.depth = 0            # blocks; 0: the trunk's (12; 24 for ViT-L)
  c.model.num_heads = 0        # 0: width / 64 (3/6/12/16 for Ti/S/B/L; MoCo v3's ViT-S: 12)
  c.model.patch_size = 16      # 16 for ImageNet; 4 (or 8) for 32-px images
  c.model.pos_embed = "learned"  # or "sincos": MoCo v3's fixed 2-D sin-cos table
  c.model.pool = "cls"         # the feature: the class token's output, or "mean" of patches
  # The position table at other crop sizes (vit.POS_RESAMPLES): "timm" (antialiased bicubic)
  # or "dino" (DINO's and eztorch's bicubic without antialiasing).
  c.model.pos_resample = "timm"
  c.model.drop_path = 0.0      # stochastic depth of the last block (block i: i / (depth - 1))
  c.model.freeze_patch_embed = False  # MoCo v3's frozen random patch projection
  # Heads (docs/SCE.md 4, 10): norm "batch" (BN after each hidden layer) or "none" (a bias
  # instead), activation "relu" or "gelu".
  c.model.projector = ml_collections.ConfigDict(dict(
      hidden_dim=512, out_dim=128, num_layers=2, last_bn=False, last_bias=True, norm="batch",
      activation="relu"))
  c.model.predictor = ml_collections.ConfigDict(dict(
      hidden_dim=4096, out_dim=c.model.projector.get_ref("out_dim"), num_layers=0,
      last_bn=False, last_bias=False, norm="batch",
      activation="relu"))  # num_layers 0: no predictor (CIFAR)
  # One forward pass, so one BatchNorm batch, per view (docs/SCE.md 2); True puts same-size
  # views in one pass (eztorch's mutual_pass: faster, pools their statistics).
  c.model.concat_views = False

  c.sce = ml_collections.ConfigDict()
  c.sce.temp = 0.1
  c.sce.temp_m = 0.05
  c.sce.coeff = 0.5
  c.sce.positive = "zero_logit"  # the authors' code; "exclude" is the paper's formula
  c.sce.queue = 4096
  c.sce.negatives = "queue"      # or "batch" (all devices' keys), "both"
  c.sce.symmetric = False        # True: ImageNet crop pairing; False: CIFAR (target view 0)
  c.sce.num_global = 2
  c.sce.m0 = 0.99
  c.sce.m_schedule = "constant"  # or "cosine" (to m_final)
  c.sce.m_final = 1.0            # the cosine schedule's last momentum
  c.sce.target_init = "copy"     # or "random" (the authors' separate init)
  c.sce.target_bn_splits = 8     # shuffle-BN in the target trunk (docs/SCE.md 3); 0: off

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"           # or "lars", "adamw" (optim.OPTIMIZERS)
  c.optim.base_lr = 0.06         # per 256 images
  c.optim.weight_decay = 5e-4    # adamw: decoupled, not on norms, biases, optim.NO_DECAY
  c.optim.momentum = 0.9         # sgd, lars
  c.optim.trust_coefficient = 1e-3  # lars
  c.optim.betas = (0.9, 0.999)   # adamw
  c.optim.eps = 1e-8             # adamw
  c.optim.clip_norm = 0.0        # > 0: gradients clipped to this global norm first; 0: off
  c.optim.warmup_epochs = 5

  c.probe = ml_collections.ConfigDict(dict(enabled=True, lr=0.1))  # online linear probe

  # Start from existing weights (pretrained.py): any file `python -m sce_jax.convert in` reads
  # ("" = a random init); its trunk starts the online and target trunks, heads "keep" its
  # projector and predictor too (else "fresh"). Read only on a fresh workdir.
  c.init = ml_collections.ConfigDict(dict(weights="", heads="fresh"))

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder"       # or "tfds", "memory" (sources.SOURCES)
  c.data.name = "cifar10"        # TFDS name
  c.data.path = ""               # source=folder: a folder of images, a .tar/.tar.gz of one, a list
  # Labels of source=folder (data/folders.py): "folders" (class folders), "none" (unlabelled:
  # a flat or nested folder, a file list), "auto" (folders when every image sits one level below
  # a class folder, else none; the run says which).
  c.data.labels = "auto"
  c.data.eval_path = ""          # "" finds the test split beside path
  # Training data from several sources, drawn in proportion to their weights (sources.Mixture):
  # "KIND:WHAT=WEIGHT,..." with KIND folder (WHAT a data.path) or tfds (WHAT a data.name), e.g.
  # "tfds:imagenet2012=0.7,folder:/data/mine=0.3"; "" = the one source of data.source. Its
  # evaluations read eval.data.
  c.data.mixture = ""
  c.data.data_dir = ""           # TFDS data_dir ("" = TFDS default)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.views = "cifar"         # a preset of sce_jax/data/presets.py (docs/SCE.md 6)
  c.data.mean = presets.CIFAR10_MEAN
  c.data.std = presets.CIFAR10_STD
  c.data.loader = "auto"         # or "tf", "grain" (pipeline.LOADERS)
  c.data.shuffle_buffer = 50_000
  c.data.num_workers = 0
  c.data.prefetch = 2
  c.data.cache = True
  c.data.cache_dir = "~/.cache/sce_jax"  # decoded arrays of .tar/.tar.gz sets of one image size
  # "crops": the host decodes and crops; "decode": the host only decodes, into a decode_size
  # square buffer (larger images reduced), and the step crops (crop.HOST_STAGES).
  c.data.host_stage = "crops"
  c.data.decode_size = 512
  c.data.on_device = False       # train set on the accelerator if it fits (data/resident.py)
  c.data.strict = False          # True: an undecodable image stops the run; False: skipped
  # Evaluation crop: the shorter side resized to eval_resize (0: image_size x 256/224 for
  # ImageNet-size images, none for small ones; crop.eval_resize), then centre-cropped.
  c.data.eval_resize = 0
  c.data.eval_interpolation = "bilinear"  # or "bicubic" (crop.INTERPOLATIONS)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
  # A labelled set given apart, which the evaluations that need labels (kNN, the probes,
  # fine-tuning) read when the training data have none: a class-folder tree (or archive) with
  # its test split beside it (path), or a TFDS name; both "": they are skipped, saying why.
  c.eval.data = ml_collections.ConfigDict(dict(path="", name=""))
  # Evaluations during pretraining (evaluators.periodic), each at its cadence: every_epochs > 0
  # every that many epochs and at the end; 0 only at the end; < 0 never.
  c.eval.knn = ml_collections.ConfigDict(dict(every_epochs=10, k=200, temp=0.1))
  c.eval.probe = ml_collections.ConfigDict(dict(every_epochs=10))  # the online probe, held out
  # The small-dataset linear protocol (docs/SCE.md 7): lr 30 (not scaled by the batch), x 0.1
  # at epochs 60 and 80. scale_lr: base_lr is per 256 images (optim.scaled_lr); schedule: one of
  # optim.LINEAR_SCHEDULES ("step": x decay_factor at each of the milestones, in epochs).
  c.eval.linear = ml_collections.ConfigDict(dict(
      epochs=100, batch_size=256, base_lr=30.0, scale_lr=False, schedule="step",
      milestones=(60, 80), decay_factor=0.1, weight_decay=0.0, momentum=0.9,
      max_steps=-1))           # max_steps > 0 stops early (smoke runs); the schedule uses epochs
  c.eval.checkpoint = ""       # imported trunk weights to evaluate (weights.load_trunk)
  # --mode=transfer, ssl-transfer's linear protocol (docs/SCE.md 9). datasets: comma-separated
  # TFDS names of transfer.PROTOCOLS and NAME=PATH entries (a class-folder tree or archive,
  # e.g. aircraft=PATH). image_size: the crop of the bicubic resize + centre crop (0:
  # data.image_size; ssl-transfer: 224). L2 weight decays: wd_values log-spaced over wd_range
  # (C = 1 / wd); max_iter: L-BFGS iterations (scikit-learn's default, as ssl-transfer);
  # val_fraction: of train held out where a set has no validation split. caltech101_split:
  # "ssl_transfer" (the split behind SCE's row) or "tfds" (transfer.CALTECH101_SPLITS).
  c.eval.transfer = ml_collections.ConfigDict(dict(
      datasets=TRANSFER_DATASETS, image_size=0, wd_range=(1e-6, 1e5), wd_values=45,
      max_iter=100, val_fraction=0.2, caltech101_split="ssl_transfer"))
  # --mode=voc07_svm, PCL's VOC07 linear SVMs (docs/SCE.md 9): images per class of the
  # low-shot runs, independent draws of each, the SVM costs; cost_rule (voc07.COST_RULES):
  # "cv" chooses each class's cost by `folds`-fold cross-validation, "best_on_test" reports
  # for each K the cost of best test mAP, as PCL's script (which produced SCE's row).
  c.eval.voc07 = ml_collections.ConfigDict(dict(
      shots=(16, 32, 64), samples=5, costs=(0.01, 0.1, 0.5, 1.0, 10.0, 100.0), folds=3,
      cost_rule="cv"))
  # --mode=finetune, SimCLR's semi-supervised protocol (docs/SCE.md 9): Nesterov SGD, lr
  # base_lr x batch / 256 (0.8 at SimCLR's 4096), cosine, no warmup, no weight decay; 60
  # epochs on 1 % of the labels, 30 on 10 %. subset: one of finetune.SUBSETS (SimCLR's ImageNet
  # lists, TFDS); '' takes `fraction` of each class of the training set. max_steps > 0 stops
  # early (smoke runs); the schedule uses epochs.
  c.eval.finetune = ml_collections.ConfigDict(dict(
      subset="", fraction=0.01, epochs=60, batch_size=256, base_lr=0.05, momentum=0.9,
      max_steps=-1))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
  c.log_every_steps = 50
  # XLA backend optimisation level 0 (set by the command line before JAX starts): a tiny CPU
  # run compiles in seconds instead of minutes, its kernels run slower.
  c.fast_compile = False
  # JAX's persistent compilation cache (compile_cache.py): a restart loads its compiled step.
  # "" is <data.cache_dir>/xla; a path or gs:// URL; "none" turns it off.
  c.compile_cache_dir = ""
  return c


def smoke(c):
  """Shrinks config `c` in place to a tiny float32 network, quick to compile: 24 steps of 32
  images, frequent logs and checkpoints, no kNN. The schedules still see `epochs` (max_steps
  stops early)."""
  c.batch_size = 32
  c.epochs = 2
  c.max_steps = 24
  c.model.width = 4
  c.model.dtype = "float32"
  c.model.projector.hidden_dim = 32
  c.model.projector.out_dim = 16
  c.model.predictor.hidden_dim = 32
  c.sce.queue = 128
  c.data.cache = False  # decode only the images the few steps read
  c.eval.batch_size = 256
  c.eval.knn.every_epochs = -1  # no evaluation while training; --mode=knn evaluates the result
  c.eval.probe.every_epochs = -1
  c.eval.linear.batch_size = 32
  c.eval.linear.max_steps = 8
  c.eval.finetune.batch_size = 32
  c.eval.finetune.max_steps = 8
  c.checkpoint.every_steps = 8
  c.log_every_steps = 4
  c.fast_compile = True


def continued(c):
  """Adapts config `c` in place to continue pretraining from a pretrained trunk (config.init,
  README "Bring your own data"): a tenth of the learning rate, 1 warm-up epoch, a quarter of
  the epochs. A starting point, not yet measured in sce_jax: a tenth of the rate is the usual
  first try when training on from pretrained weights; fewer epochs follow Reed et al. 2022
  (HPT, "Self-Supervised Pretraining Improves Self-Supervised Pretraining", WACV), where
  pretraining that starts from an existing model converges up to 80x faster than from scratch;
  the warm-up only has to settle the fresh heads and optimiser. Measure on your data."""
  c.optim.base_lr *= 0.1
  c.optim.warmup_epochs = 1
  c.epochs = max(1, c.epochs // 4)


def imagenet(c, multicrop=False):
  """Points config `c` at ImageNet (TFDS imagenet2012, manual download): 224-px crops of the
  2-crop or multi-crop preset (docs/SCE.md 6) with ImageNet's statistics, evaluation on the
  validation split, kNN only at the end (1.28M images), the cadences of a long run."""
  c.data.update(source="tfds", name="imagenet2012", eval_split="validation", image_size=224,
                views="imagenet_multi_crop" if multicrop else "imagenet_two_crop",
                mean=presets.IMAGENET_MEAN, std=presets.IMAGENET_STD, cache=False)
  c.eval.knn.every_epochs = 0
  c.checkpoint.every_steps = 2500
  c.log_every_steps = 100


class ConfigError(ValueError):
  """A config that cannot run; the message says what is wrong and how to fix it."""


def check_file(file):
  """ConfigError unless config file `file` exists."""
  if not pathlib.Path(file).is_file():
    raise ConfigError(f"config file {file!r} does not exist; pass --config=configs/<name>.py"
                      "[:variants] (e.g. configs/cifar10_r18.py:smoke).")


def load(spec, method=None) -> ml_collections.ConfigDict:
  """'configs/FILE.py[:ARG]' -> the file's get_config(ARG), locked: what --config=SPEC gives
  the command line (ml_collections' config_flags), for code and tests. method: that method's
  recipe (the file's `method` variant), what --config.method=NAME gives."""
  file, _, arg = spec.partition(":")
  check_file(file)
  if method is not None:
    arg = ",".join(filter(None, (arg, f"method={method}")))
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(file).stem, file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  return config


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """A config file's variant string, e.g. 'multicrop,epochs=200', over `defaults`.

  A bare name sets a boolean variant; name=value converts value to the default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, eq, value = item.partition("=")
    if name == "method" and name not in defaults:  # what --config.method=NAME passes
      raise ConfigError("This config file has no other methods' recipes; --config.method works "
                        "with configs/cifar10_r18.py, cifar100_r18.py and imagenet_r50.py.")
    if name not in defaults:
      raise ConfigError(f"Unknown config variant {name!r}; known: {sorted(defaults)} "
                        "(e.g. --config=configs/FILE.py:name,key=value).")
    kind = type(defaults[name])
    if kind is bool:
      if eq and value not in ("true", "false"):
        raise ConfigError(f"Variant {name} is a switch: write {name} or {name}=false.")
      out[name] = not eq or value == "true"
    elif not eq:
      raise ConfigError(f"Variant {name} needs a value: {name}=<{kind.__name__}>.")
    else:
      out[name] = kind(value)
  return out

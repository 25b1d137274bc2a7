"""The configuration schema: every key a run can set, with the CIFAR-10 defaults.

Config files in configs/ start from `base()` and change values only; the dict is locked, so a
misspelt key (in a file or in a --config.key=value override) is an error, not a silent no-op.
Names follow docs/SCE.md section 5. `load` reads a config file as the command line does,
`parse_arg` a config file's variant string; `validate` stops a run that cannot work before
anything compiles; `describe` lists the keys (--config_help).
"""
import ast
import importlib.util
import inspect
import io
import pathlib
import tokenize
import uuid

import flax.traverse_util
import ml_collections
from etils import epath

from sce_jax import losses, optim, state
from sce_jax.data import crop, pipeline, presets, sources
from sce_jax.evaluators import finetune, transfer
from sce_jax.models import heads, sce, vit


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256           # global batch, all devices and processes
  c.epochs = 200
  c.max_steps = -1             # > 0 stops early (smoke runs); schedules still use epochs

  c.model = ml_collections.ConfigDict()
  c.model.trunk = "resnet18"   # models.TRUNKS: resnet18/34/50/101, vit_tiny/small/base/large
  c.model.width = 0            # 0: the trunk's (64 for ResNets; 192/384/768/1024 for ViT-Ti/S/B/L)
  c.model.small_stem = True    # 3x3 stride-1 stem without max-pool for 32-pixel images
  c.model.dtype = "bfloat16"   # computation; parameters stay float32
  # bfloat16/float16 layers compute and sum their weight gradients in float32, as the authors'
  # AMP (models/precision.py, docs/SCE.md 5); False: plain Flax (bf16 gradient sums), to compare.
  c.model.f32_weight_grads = True
  # Rematerialisation (models.REMATS): "block" recomputes each residual / transformer block's
  # activations in the backward pass, "full" the whole trunk's: less memory, more FLOPs.
  c.model.remat = "none"
  # ViT trunks (docs/SCE.md 10); ResNets ignore these.
  c.model.depth = 0            # blocks; 0: the trunk's (12; 24 for ViT-L)
  c.model.num_heads = 0        # 0: width / 64 (3/6/12/16 for Ti/S/B/L; MoCo v3's ViT-S: 12)
  c.model.patch_size = 16      # 16 for ImageNet; 4 (or 8) for 32-px images
  c.model.pos_embed = "learned"  # or "sincos": MoCo v3's fixed 2-D sin-cos table
  c.model.pool = "cls"         # the feature: the class token's output, or "mean" of patches
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
  c.sce.m_schedule = "constant"  # or "cosine" (to 1)
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

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder"       # or "tfds", "memory" (sources.SOURCES)
  c.data.name = "cifar10"        # TFDS name
  c.data.path = ""               # class-folder tree or .tar/.tar.gz for source=folder
  c.data.eval_path = ""          # "" finds the test split beside path
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
  c.data.on_device = False       # train set on the accelerator if it fits (data/device.py)
  c.data.strict = False          # True: an undecodable image stops the run; False: skipped
  # Evaluation crop: the shorter side resized to eval_resize (0: image_size x 256/224 for
  # ImageNet-size images, none for small ones; crop.eval_resize), then centre-cropped.
  c.data.eval_resize = 0
  c.data.eval_interpolation = "bilinear"  # or "bicubic" (crop.INTERPOLATIONS)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
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
  # val_fraction: of train held out where a set has no validation split.
  c.eval.transfer = ml_collections.ConfigDict(dict(
      datasets=transfer.DEFAULT_DATASETS, image_size=0, wd_range=(1e-6, 1e5), wd_values=45,
      max_iter=100, val_fraction=0.2))
  # --mode=voc07_svm, PCL's VOC07 linear SVMs (docs/SCE.md 9): images per class of the
  # low-shot runs, independent draws of each, SVM costs chosen per class by `folds`-fold
  # cross-validation.
  c.eval.voc07 = ml_collections.ConfigDict(dict(
      shots=(16, 32, 64), samples=5, costs=(0.01, 0.1, 0.5, 1.0, 10.0, 100.0), folds=3))
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


def load(spec) -> ml_collections.ConfigDict:
  """'configs/FILE.py[:ARG]' -> the file's get_config(ARG), locked: what --config=SPEC gives
  the command line (ml_collections' config_flags), for code and tests."""
  file, _, arg = spec.partition(":")
  check_file(file)
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


# Keys with a fixed set of values, each list owned by the module that reads the key; checked
# here, once, before anything compiles.
ENUMS = {
    "model.trunk": sce.TRUNKS,
    "model.dtype": sce.DTYPES,
    "model.remat": sce.REMATS,
    "model.pos_embed": vit.POS_EMBEDS,
    "model.pool": vit.POOLS,
    "model.projector.norm": heads.NORMS,
    "model.projector.activation": tuple(heads.ACTIVATIONS),
    "model.predictor.norm": heads.NORMS,
    "model.predictor.activation": tuple(heads.ACTIVATIONS),
    "sce.positive": tuple(losses.POSITIVE_LOGIT),
    "sce.negatives": losses.NEGATIVES,
    "sce.m_schedule": optim.M_SCHEDULES,
    "sce.target_init": state.TARGET_INITS,
    "optim.name": optim.OPTIMIZERS,
    "eval.linear.schedule": optim.LINEAR_SCHEDULES,
    "eval.finetune.subset": finetune.SUBSETS,
    "data.source": tuple(sources.SOURCES),
    "data.loader": pipeline.LOADERS,
    "data.views": tuple(presets.PRESETS),
    "data.eval_interpolation": crop.INTERPOLATIONS,
}


def crops(config, views=None):
  """(views, pairs) of a run (docs/SCE.md 2): the presets.ViewSpec of each crop of
  config.data.views (or `views`, benchmarks) and their losses.crop_pairs."""
  views = tuple(views or presets.get(config.data.views, config.data.image_size))
  return views, losses.crop_pairs(len(views), config.sce.num_global, config.sce.symmetric)


def num_target_views(config) -> int:
  """Views the target embeds each step (docs/SCE.md 2): every global crop if symmetric, else one."""
  return len(losses.target_views(crops(config)[1]))


# Counts and intervals that must be at least 1.
POSITIVE = ("batch_size", "epochs", "eval.batch_size", "eval.linear.batch_size",
            "eval.linear.epochs", "eval.finetune.batch_size", "eval.finetune.epochs",
            "eval.transfer.wd_values", "eval.transfer.max_iter", "eval.voc07.samples",
            "checkpoint.every_steps", "checkpoint.keep", "log_every_steps")


# Numeric keys that must lie in a range: key -> (whether a value does, the range in words); of
# a tuple, each item. Counts of at least 1 that every config sets are POSITIVE's.
_COUNT = (lambda v: v >= 1, ">= 1")
_SOME = (lambda v: v >= 0, ">= 0")
_RATE = (lambda v: v > 0, "> 0")  # temperatures, learning rates: a divisor, or a step size
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_MOMENTUM = (lambda v: 0 <= v < 1, "in [0, 1)")  # 1 would never forget the first gradient
_DECAY = (lambda v: 0 < v <= 1, "in (0, 1]")
RANGES = {
    "model.projector.hidden_dim": _COUNT,
    "model.projector.out_dim": _COUNT,
    "model.projector.num_layers": _COUNT,
    "model.predictor.hidden_dim": _COUNT,
    "model.predictor.num_layers": _SOME,
    "sce.temp": _RATE,
    "sce.temp_m": _RATE,
    "sce.coeff": _FRACTION,
    "sce.m0": _FRACTION,
    "sce.num_global": _COUNT,
    "optim.base_lr": _RATE,
    "optim.weight_decay": _SOME,
    "optim.momentum": _MOMENTUM,
    "optim.trust_coefficient": _RATE,
    "optim.warmup_epochs": _SOME,
    "probe.lr": _RATE,
    "data.image_size": _COUNT,
    "data.shuffle_buffer": _COUNT,
    "data.num_workers": _SOME,
    "data.prefetch": _SOME,
    "data.mean": _FRACTION,
    "data.std": _RATE,
    "eval.knn.k": _COUNT,
    "eval.knn.temp": _RATE,
    "eval.linear.base_lr": _RATE,
    "eval.linear.milestones": _SOME,
    "eval.linear.decay_factor": _DECAY,
    "eval.linear.weight_decay": _SOME,
    "eval.linear.momentum": _MOMENTUM,
}


def _check_ranges(config):
  """ConfigError naming the first key of RANGES whose value lies outside its range."""
  for key, (inside, words) in RANGES.items():
    value = config[key]
    if not all(map(inside, value if isinstance(value, (tuple, list)) else (value,))):
      raise ConfigError(f"{key}={value} is out of range; set --config.{key} to a value {words}"
                        f"{' (each)' if isinstance(value, (tuple, list)) else ''}.")


def validate(config, num_devices, num_processes, workdir=None):
  """Raises ConfigError, naming the key and a fix, for a run that cannot work: a value outside
  ENUMS or RANGES, a count in POSITIVE below 1, a batch that does not split over the devices
  and processes or into the shuffle-BN groups, a queue that is not a positive multiple of the
  keys written each step, a workdir (if given) that cannot be written. The data are checked
  when they are opened (`sources.Splits`) and by `check_data_size`."""
  for key in POSITIVE:
    if config[key] <= 0:
      raise ConfigError(f"{key}={config[key]} must be at least 1; set --config.{key} to a "
                        "positive value.")
  _check_ranges(config)
  for key, allowed in ENUMS.items():
    value = config[key]
    if value not in allowed:
      raise ConfigError(f"{key}={value!r} is not a known value; set --config.{key} to one of "
                        f"{', '.join(map(repr, allowed))}.")
  for key in ("batch_size", "eval.batch_size", "eval.linear.batch_size",
              "eval.finetune.batch_size"):
    for count, what in ((num_devices, "devices"), (num_processes, "processes")):
      if config[key] % count:
        raise ConfigError(
            f"{key}={config[key]} does not split evenly over {count} {what}; set "
            f"--config.{key} to a multiple of {count}, e.g. {_multiple(config[key], count)}.")
  _check_model(config)
  splits = config.sce.target_bn_splits
  if splits < 0 or (splits and config.batch_size % splits):
    raise ConfigError(
        f"sce.target_bn_splits={splits} does not divide batch_size={config.batch_size} into "
        "shuffle-BN groups; set --config.sce.target_bn_splits to a divisor of the batch (8 in "
        "the CIFAR recipe) or 0 to turn shuffle-BN off.")
  if losses.uses_queue(config.sce.negatives):
    written = config.batch_size * num_target_views(config)
    if config.sce.queue <= 0 or config.sce.queue % written:
      raise ConfigError(
          f"sce.queue={config.sce.queue} is not a positive multiple of the {written} target "
          f"embeddings written to it each step (batch_size {config.batch_size} x "
          f"{num_target_views(config)} target views); set --config.sce.queue="
          f"{_multiple(config.sce.queue, written)} or another multiple of {written}.")
  _validate_evaluations(config)
  if workdir is not None:
    _check_writable(workdir)


def _validate_evaluations(config):
  """The ranges of the transfer, VOC07 and fine-tuning keys (docs/SCE.md 9)."""
  ev = config.eval
  try:
    transfer.parse_datasets(ev.transfer.datasets)
  except ValueError as e:
    raise ConfigError(f"{e}; fix --config.eval.transfer.datasets.") from e
  checks = (
      ("eval.transfer.wd_range", 0 < ev.transfer.wd_range[0] <= ev.transfer.wd_range[1],
       "(low, high) with 0 < low <= high, e.g. (1e-6, 1e5)"),
      ("eval.transfer.val_fraction", 0 < ev.transfer.val_fraction < 1, "in (0, 1), e.g. 0.2"),
      ("eval.voc07.shots", all(k >= 1 for k in ev.voc07.shots), "images per class >= 1"),
      ("eval.voc07.costs", len(ev.voc07.costs) > 0 and min(ev.voc07.costs) > 0,
       "positive SVM costs"),
      ("eval.voc07.folds", ev.voc07.folds >= 2, "at least 2 cross-validation folds"),
      ("eval.finetune.fraction", 0 < ev.finetune.fraction <= 1,
       "a fraction of the labels in (0, 1], e.g. 0.01"),
  )
  for key, ok, fix in checks:
    if not ok:
      raise ConfigError(f"{key}={config[key]!r} is out of range; set --config.{key} to {fix}.")


def _check_model(config):
  """The trunk's and heads' sizes and the ViT's constraints (docs/SCE.md 10)."""
  m = config.model
  for key in ("width", "depth", "num_heads", "optim.clip_norm"):
    key = key if "." in key else f"model.{key}"
    if config[key] < 0:
      raise ConfigError(f"{key}={config[key]} is negative; set --config.{key} to 0 (the "
                        "default) or a positive value.")
  if not 0 <= m.drop_path < 1:
    raise ConfigError(f"model.drop_path={m.drop_path} is a probability of dropping a block; set "
                      "--config.model.drop_path in [0, 1) (0.1 in the authors' ViT runs).")
  for head in ("projector", "predictor"):
    if m[head].last_bn and m[head].norm != "batch":
      raise ConfigError(f"model.{head}.last_bn=True needs model.{head}.norm='batch'; set one "
                        "of them.")
  if not sce.is_vit(m):
    if m.freeze_patch_embed or m.drop_path:
      raise ConfigError(f"model.freeze_patch_embed and model.drop_path apply to ViT trunks, not "
                        f"{m.trunk}; leave them at False and 0.")
    return
  if config.sce.target_bn_splits:
    raise ConfigError(
        f"sce.target_bn_splits={config.sce.target_bn_splits}: a ViT has no BatchNorm, so there "
        "is no shuffle-BN to split; set --config.sce.target_bn_splits=0.")
  width, _, heads_ = vit.dims(m.trunk, m.width, m.depth, m.num_heads)
  if width % heads_:
    raise ConfigError(f"model.width={width} does not split into model.num_heads={heads_} "
                      "attention heads; set --config.model.num_heads to a divisor of the width.")
  if m.pos_embed == "sincos" and width % 4:
    raise ConfigError(f"model.pos_embed='sincos' needs a width divisible by 4, not {width}; set "
                      "--config.model.width or --config.model.pos_embed=learned.")
  sizes = sorted({v.size for v in crops(config)[0]} | {config.data.image_size})
  if m.patch_size < 1 or any(s % m.patch_size for s in sizes):
    raise ConfigError(
        f"model.patch_size={m.patch_size} does not divide the crop sizes {sizes}; set "
        "--config.model.patch_size to a divisor of each (16 for ImageNet, 4 for 32-px images).")


def check_data_size(config, num_examples):
  """ConfigError if the training split holds less than one batch."""
  if num_examples < config.batch_size:
    raise ConfigError(
        f"The training split has {num_examples} images, fewer than one batch (batch_size="
        f"{config.batch_size}); set --config.batch_size to at most {num_examples} (a multiple "
        "of the device count), or point data.path at more images.")


def _multiple(value, divisor):
  return max(divisor, round(value / divisor) * divisor)


def _check_writable(workdir):
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test.{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable ({e}); pass --workdir=<a directory "
                      "this job can write>.") from e


def describe() -> str:
  """Every key of the schema with its default, the comments base() declares it with (the
  comment lines above it and those of its own lines; a key of a section declared in one
  statement takes the section's) and its allowed values or range: --config_help. Read from
  base()'s source, so that it cannot drift from it."""
  source = inspect.getsource(base)
  lines = source.splitlines()
  comments = {t.start[0]: t.string.lstrip("# ") for t in
              tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT}
  meaning = {}
  for node in ast.parse(source).body[0].body:
    target = node.targets[0] if isinstance(node, ast.Assign) else None
    if not isinstance(target, ast.Attribute):
      continue
    key = ast.unparse(target).removeprefix("c.")
    above = node.lineno - 1
    while above in comments and lines[above - 1].lstrip().startswith("#"):
      above -= 1
    meaning[key] = " ".join(comments[n] for n in range(above + 1, node.end_lineno + 1)
                            if n in comments).rstrip(".")
  out = ["Config keys (--config.KEY=VALUE): base()'s defaults, the CIFAR-10 recipe; each config "
         "file in configs/ changes some."]
  for key, value in flax.traverse_util.flatten_dict(base().to_dict(), sep=".").items():
    parts = key.split(".")
    notes = [next((meaning[p] for p in (".".join(parts[:i]) for i in range(len(parts), 0, -1))
                   if meaning.get(p)), "")]
    if key in ENUMS:
      notes.append(f"one of {', '.join(map(repr, ENUMS[key]))}")
    if key in RANGES:
      notes.append(RANGES[key][1])
    if key in POSITIVE:
      notes.append(">= 1")
    notes = "; ".join(filter(None, notes))
    out.append(f"  {key} = {value!r}" + (f"  # {notes}" if notes else ""))
  return "\n".join(out)

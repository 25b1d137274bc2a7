"""The configuration schema: what each key of config.py may hold, checked before anything runs.

Above the modules that own the lists (docs/SCE.md 5): `ENUMS` (keys with a fixed set of values,
each list its reader's), `RANGES` and `POSITIVE` (numeric keys), `validate` (a run that cannot
work stops here, before anything compiles, with a one-line ConfigError naming the key and the
fix), `crops` (a run's views and the pairs the loss compares) and `describe` (--config_help).
config.py, below everything, keeps the keys and their defaults.
"""
import ast
import inspect
import io
import tokenize
import uuid

import flax.traverse_util
from etils import epath

from sce_jax import config as config_lib
from sce_jax import losses, methods, optim, sharding, state
from sce_jax.config import ConfigError
from sce_jax.data import crop, folders, pipeline, presets, sources
from sce_jax.evaluators import finetune, transfer, voc07
from sce_jax.models import heads, sce, trunks, vit


# Names a key is known by elsewhere (papers, other code) -> its name here, suggested for an
# unknown key of the command line (cli.py): --config.sce.temperature -> sce.temp.
ALIASES = {"temperature": "temp", "tau": "temp", "teacher_temp": "temp_m",
           "temperature_m": "temp_m", "lambda": "coeff", "lambda_": "coeff",
           "queue_size": "queue", "num_negatives": "queue", "momentum": "m0", "ema": "m0",
           "lr": "base_lr", "learning_rate": "base_lr", "wd": "weight_decay",
           "arch": "trunk", "backbone": "trunk", "image_dir": "path", "data_path": "path",
           "steps": "max_steps", "num_epochs": "epochs", "warmup": "warmup_epochs"}


# Keys with a fixed set of values, each list owned by the module that reads the key; checked
# here, once, before anything compiles.
ENUMS = {
    "method": tuple(methods.METHODS),
    "model.trunk": trunks.TRUNKS,
    "model.dtype": sce.DTYPES,
    "model.remat": trunks.REMATS,
    "model.pos_embed": vit.POS_EMBEDS,
    "model.pool": vit.POOLS,
    "model.projector.norm": heads.NORMS,
    "model.projector.activation": tuple(heads.ACTIVATIONS),
    "model.predictor.norm": heads.NORMS,
    "model.predictor.activation": tuple(heads.ACTIVATIONS),
    "sce.positive": tuple(losses.POSITIVE_LOGIT),
    "sce.negatives": losses.NEGATIVES,
    "sce.m_schedule": optim.M_SCHEDULES,
    "optim.wd_schedule": optim.WD_SCHEDULES,
    "optim.clip_scope": optim.CLIP_SCOPES,
    "sce.target_init": state.TARGET_INITS,
    "init.heads": state.INIT_HEADS,
    "optim.name": optim.OPTIMIZERS,
    "eval.linear.schedule": optim.LINEAR_SCHEDULES,
    "eval.finetune.subset": finetune.SUBSETS,
    "model.pos_resample": vit.POS_RESAMPLES,
    "eval.transfer.caltech101_split": transfer.CALTECH101_SPLITS,
    "eval.voc07.cost_rule": voc07.COST_RULES,
    "data.source": tuple(sources.SOURCES),
    "data.loader": pipeline.LOADERS,
    "data.labels": folders.LABELS,
    "data.host_stage": crop.HOST_STAGES,
    "data.views": tuple(presets.PRESETS),
    "data.eval_interpolation": crop.INTERPOLATIONS,
    "sharding.params": sharding.PARAMS,
}


def crops(config, views=None):
  """(views, pairs) of a run (docs/SCE.md 2): the presets.ViewSpec of each crop of
  config.data.views (or `views`, benchmarks) and the method's crop pairs (losses.crop_pairs)."""
  views = tuple(views or presets.get(config.data.views, config.data.image_size))
  return views, methods.get(config.method).pairs(config, len(views))


def num_target_views(config) -> int:
  """Views the target embeds each step (docs/SCE.md 2): every global crop if symmetric, else one."""
  return len(losses.target_views(crops(config)[1]))


# Counts and intervals that must be at least 1.
POSITIVE = ("batch_size", "epochs", "eval.batch_size", "eval.linear.batch_size",
            "eval.linear.epochs", "eval.finetune.batch_size", "eval.finetune.epochs",
            "eval.transfer.wd_values", "eval.transfer.max_iter", "eval.voc07.samples",
            "checkpoint.every_steps", "checkpoint.keep", "log_every_steps")


# Numeric keys that must lie in a range: key -> (whether a value does, the range in words); of
# a tuple, each item. Counts of at least 1 that every config sets are POSITIVE's; every other
# numeric key of base() is here (tests/test_config.py walks them), model.predictor.out_dim
# through the projector's, which it refers to.
_COUNT = (lambda v: v >= 1, ">= 1")
_SOME = (lambda v: v >= 0, ">= 0")
_ANY = (lambda v: True, "any integer")  # max_steps, every_epochs: their comments say how
_RATE = (lambda v: v > 0, "> 0")  # temperatures, learning rates: a divisor, or a step size
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_MOMENTUM = (lambda v: 0 <= v < 1, "in [0, 1)")  # 1 would never forget the first gradient
_DECAY = (lambda v: 0 < v <= 1, "in (0, 1]")
_HOLDOUT = (lambda v: 0 < v < 1, "in (0, 1)")
RANGES = {
    "seed": _SOME,  # NumPy's generators refuse negative seeds
    "max_steps": _ANY,
    "model.width": _SOME,  # 0: the trunk's
    "model.depth": _SOME,
    "model.num_heads": _SOME,
    "model.patch_size": _COUNT,
    "model.drop_path": _MOMENTUM,  # a probability of dropping a block (0.1 in the authors' ViTs)
    "model.projector.hidden_dim": _COUNT,
    "model.projector.out_dim": _COUNT,
    "model.projector.num_layers": _COUNT,
    "model.projector.bottleneck_dim": _SOME,  # 0: no DINO head
    "model.predictor.hidden_dim": _COUNT,
    "model.predictor.num_layers": _SOME,
    "sce.temp": _RATE,
    "sce.temp_m": _RATE,
    "sce.coeff": _FRACTION,
    "sce.m0": _FRACTION,
    "sce.m_final": _FRACTION,
    "sce.num_global": _COUNT,
    "sce.queue": _SOME,  # and a multiple of the keys written each step, where it is used
    "sce.target_bn_splits": _SOME,  # and a divisor of the batch; 0: off
    "sce.temp_m_warmup": _RATE,
    "sce.temp_m_warmup_epochs": _SOME,
    "sce.center_m": _FRACTION,
    "optim.base_lr": _RATE,
    "optim.weight_decay": _SOME,
    "optim.momentum": _MOMENTUM,
    "optim.trust_coefficient": _RATE,
    "optim.betas": _MOMENTUM,
    "optim.eps": _RATE,
    "optim.clip_norm": _SOME,
    "optim.warmup_epochs": _SOME,
    "optim.accum_steps": _COUNT,  # and a divisor of the batch's rows on each device
    "optim.min_lr": _SOME,
    "optim.weight_decay_end": _SOME,
    "optim.freeze_last_layer": _SOME,
    "probe.lr": _RATE,
    "sharding.min_size_mib": _SOME,  # 0: every array a dimension of which the devices divide
    "data.image_size": _COUNT,
    "data.shuffle_buffer": _COUNT,
    "data.decode_size": _COUNT,
    "data.num_workers": _SOME,
    "data.prefetch": _SOME,
    "data.mean": _FRACTION,
    "data.std": _RATE,
    "data.eval_resize": _SOME,
    "eval.knn.every_epochs": _ANY,
    "eval.knn.k": _COUNT,
    "eval.knn.temp": _RATE,
    "eval.probe.every_epochs": _ANY,
    "eval.linear.base_lr": _RATE,
    "eval.linear.milestones": _SOME,
    "eval.linear.decay_factor": _DECAY,
    "eval.linear.weight_decay": _SOME,
    "eval.linear.momentum": _MOMENTUM,
    "eval.linear.max_steps": _ANY,
    "eval.transfer.image_size": _SOME,  # 0: data.image_size
    "eval.transfer.wd_range": _RATE,  # and low <= high
    "eval.transfer.val_fraction": _HOLDOUT,
    "eval.voc07.shots": _COUNT,
    "eval.voc07.costs": _RATE,  # and at least one
    "eval.voc07.folds": (lambda v: v >= 2, ">= 2"),  # cross-validation folds
    "eval.finetune.fraction": _DECAY,
    "eval.finetune.base_lr": _RATE,
    "eval.finetune.momentum": _MOMENTUM,
    "eval.finetune.max_steps": _ANY,
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
  ENUMS or RANGES, a count in POSITIVE below 1, a data.path the source would not read, a batch
  that does not split over the devices and processes, into the micro-batches of
  optim.accum_steps or into the shuffle-BN groups, accumulation with a method that cannot
  accumulate, a queue that is not a positive multiple of the keys written each step, a workdir
  (if given) that cannot be written. The data are checked when they are opened
  (`sources.Splits`) and by `check_data_size`."""
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
  if config.data.path and config.data.source != "folder":
    raise ConfigError(
        f"data.path={config.data.path} is read by data.source='folder' only, and this config's "
        f"source is {config.data.source!r} ({config.data.name!r}); add "
        "--config.data.source=folder to read the path, or leave data.path empty.")
  _check_mixture(config.data)
  for key in ("batch_size", "eval.batch_size", "eval.linear.batch_size",
              "eval.finetune.batch_size"):
    for count, what in ((num_devices, "devices"), (num_processes, "processes")):
      if config[key] % count:
        raise ConfigError(
            f"{key}={config[key]} does not split evenly over {count} {what}; set "
            f"--config.{key} to a multiple of {count}, e.g. {_multiple(config[key], count)}.")
  _check_accumulation(config, num_devices)
  _check_model(config)
  splits = config.sce.target_bn_splits
  if splits and config.batch_size % splits:
    raise ConfigError(
        f"sce.target_bn_splits={splits} does not divide batch_size={config.batch_size} into "
        "shuffle-BN groups; set --config.sce.target_bn_splits to a divisor of the batch (8 in "
        "the CIFAR recipe) or 0 to turn shuffle-BN off.")
  if methods.get(config.method).uses_queue(config):
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


def _check_mixture(data):
  """data.mixture's form (`sources.parse_mixture`: positive weights), its folders, and that it
  alone names the training data; its TFDS names, labels and image sizes are checked when it is
  opened (`sources.Mixture`)."""
  if not data.mixture:
    return
  try:
    parts = sources.parse_mixture(data.mixture)
  except ValueError as e:
    raise ConfigError(f"{e}; fix --config.data.mixture.") from e
  for kind, what, _ in parts:
    if kind == "folder" and not epath.Path(what).exists():
      raise ConfigError(f"data.mixture's folder:{what} does not exist; fix "
                        "--config.data.mixture (a folder of images, a .tar/.tar.gz of one, or a "
                        "text file listing images).")
  if data.path:
    raise ConfigError(f"data.path={data.path} and data.mixture both name the training data; "
                      "put the path in the mixture (folder:PATH=WEIGHT) and pass "
                      "--config.data.path=''.")


def _validate_evaluations(config):
  """The transfer data sets and the relations RANGES cannot state (docs/SCE.md 9)."""
  ev = config.eval
  try:
    transfer.parse_datasets(ev.transfer.datasets)
  except ValueError as e:
    raise ConfigError(f"{e}; fix --config.eval.transfer.datasets.") from e
  checks = (  # Beyond RANGES' checks of each value.
      ("eval.transfer.wd_range", ev.transfer.wd_range[0] <= ev.transfer.wd_range[1],
       "(low, high) with 0 < low <= high, e.g. (1e-6, 1e5)"),
      ("eval.voc07.costs", len(ev.voc07.costs) > 0, "positive SVM costs, at least one"),
  )
  for key, ok, fix in checks:
    if not ok:
      raise ConfigError(f"{key}={config[key]!r} is out of range; set --config.{key} to {fix}.")


def _check_accumulation(config, num_devices):
  """optim.accum_steps (train_step.py): micro-batches of whole rows on every device, and a
  method whose loss can be summed over them (an EMA target embeds the whole batch first)."""
  k = config.optim.accum_steps
  if k > 1 and not methods.get(config.method).EMA_TARGET:
    exact = ", ".join(n for n, m in methods.METHODS.items() if m.EMA_TARGET)
    raise ConfigError(
        f"optim.accum_steps={k} cannot split a {config.method} step: its loss needs the online "
        "embeddings of the whole batch with their gradients (no EMA target to embed the batch "
        f"first); set --config.optim.accum_steps=1, or use a method with one ({exact}).")
  if config.batch_size % (num_devices * k):
    raise ConfigError(
        f"batch_size={config.batch_size} does not split into {num_devices} devices x "
        f"optim.accum_steps={k} micro-batches; set --config.batch_size to a multiple of "
        f"{num_devices * k}, e.g. {_multiple(config.batch_size, num_devices * k)}, or "
        "--config.optim.accum_steps to a divisor of the rows a device holds.")


def _check_model(config):
  """The trunk's and heads' sizes, and what its family asks (a ViT's: docs/SCE.md 10)."""
  m = config.model
  for head in ("projector", "predictor"):
    if m[head].last_bn and m[head].norm != "batch":
      raise ConfigError(f"model.{head}.last_bn=True needs model.{head}.norm='batch'; set one "
                        "of them.")
  if m.projector.bottleneck_dim and m.projector.last_bn:
    raise ConfigError("model.projector.bottleneck_dim > 0 (DINO's head) ends in its weight-"
                      "normalised layer, without BN; set model.projector.last_bn=False.")
  family = trunks.family(m)
  if config.sce.target_bn_splits and not family.HAS_BATCH_STATS:
    raise ConfigError(
        f"sce.target_bn_splits={config.sce.target_bn_splits}: a {family.NAME} has no BatchNorm, "
        "so there is no shuffle-BN to split; set --config.sce.target_bn_splits=0.")
  sizes = {v.size for v in presets.get(config.data.views, config.data.image_size)}
  problem = family.config_problem(m, sizes | {config.data.image_size})
  if problem:
    raise ConfigError(problem)


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
  comment lines above it and those of its own lines; the comment of a section declared in one
  statement is printed once, above its first key) and its allowed values or range:
  --config_help. Read from config.base()'s source, so that it cannot drift from it."""
  source = inspect.getsource(config_lib.base)
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
  shown = set()  # sections whose comment is printed, once, above their first key
  for key, value in flax.traverse_util.flatten_dict(config_lib.base().to_dict(), sep=".").items():
    parts = key.split(".")
    section = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                    if meaning.get(p)), None)
    if not meaning.get(key) and section and section not in shown:
      shown.add(section)
      out.append(f"  # {section}: {meaning[section]}")
    notes = [meaning.get(key, "")]
    if key in ENUMS:
      notes.append(f"one of {', '.join(map(repr, ENUMS[key]))}")
    if key in RANGES:
      notes.append(RANGES[key][1])
    if key in POSITIVE:
      notes.append(">= 1")
    notes = "; ".join(filter(None, notes))
    out.append(f"  {key} = {value!r}" + (f"  # {notes}" if notes else ""))
  return "\n".join(out)

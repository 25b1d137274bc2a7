"""Pretraining that starts from existing weights: config.init (README, "Bring your own data").

`--config.init.weights=PATH` takes any file `python -m sce_jax.convert in` reads (torchvision,
timm, MoCo v2/v3, DINO, the authors' checkpoints, an sce_jax checkpoint or workdir; weights.py
owns the layouts). Its online trunk, and with init.heads='keep' the heads it holds, replace the
online network's and the target's (a copy, as sce.target_init='copy' starts: the target is the
EMA of what the online network starts from). The optimiser, the queue, the probe and the
schedules start fresh; the file is read only when the workdir has no checkpoint, so a resumed
run restores its own state and never re-imports (config.json records init.weights).
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sce_jax import checkpoint, sharding, weights
from sce_jax import config as sce_config
from sce_jax.models import vit

_HEAD_PARTS = ("projector", "predictor")


def _has_checkpoint(workdir) -> bool:
  """Whether `workdir` holds a complete checkpoint (orbax names a step's directory by its number
  once it is whole)."""
  folder = checkpoint.checkpoints_dir(workdir)
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def read(config, workdir):
  """The online network parts of config.init.weights, validated against config.model, as
  {'params': {part: tree}, 'batch_stats': {part: tree}} of NumPy arrays; None without
  init.weights, or when `workdir` holds a checkpoint (the run resumes it). A file that does not
  fit is a ConfigError of one line naming the first key or shape that differs, raised before
  anything compiles."""
  path = config.init.weights
  if not path:
    return None
  if _has_checkpoint(workdir):
    logging.info("%s holds a checkpoint: resuming it; init.weights=%s is not read again.",
                 workdir, path)
    return None
  fix = ("set --config.model to the file's trunk (python -m sce_jax.convert in FILE OUT "
         "names it), or point --config.init.weights at weights of this one")
  try:
    variables, layout = weights.read(path)
  except (OSError, ValueError, ImportError) as e:
    raise sce_config.ConfigError(f"init.weights={path} cannot be read ({e}); pass a file "
                                 "python -m sce_jax.convert in reads.") from e
  params = variables.get("params", {})
  if "trunk" not in params:
    raise sce_config.ConfigError(f"init.weights={path} holds no online trunk "
                                 f"({weights.describe(variables)}); {fix}.")
  parts = ["trunk"]
  if config.init.heads == "keep":
    parts += [p for p in _HEAD_PARTS if p in params]
  try:
    problems = weights.mismatches(variables, config.model, [("online", p) for p in parts],
                                  source=f"init.weights={path}", layout=layout)
  except ValueError as e:  # another kind or depth of trunk: one line already
    raise sce_config.ConfigError(f"{e}; {fix}.") from e
  if problems:  # the first two: a trunk's summary line is followed by its first key
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    raise sce_config.ConfigError(
        f"init.weights={path} does not fit the config ({weights.describe_trunk(config.model)})"
        f": {'; '.join(problems[:2])}{more}; {fix}.")
  logging.info("Starting from init.weights=%s (%s layout): the online and target %s; the "
               "optimiser, queue and schedules start fresh.", path, layout, ", ".join(parts))
  return {c: {p: variables[c][p] for p in parts if p in variables.get(c, {})}
          for c in ("params", "batch_stats")}


def _fit(imported, like):
  """An imported array as the state's leaf `like` (its dtype, its sharding); a ViT position
  table of another grid resampled to the state's (`vit.resample_pos_embed`)."""
  x = np.asarray(imported, like.dtype)
  if x.shape != like.shape:  # weights.mismatches lets only a position table differ
    grid = round((like.shape[1] - 1) ** 0.5)
    x = np.asarray(vit.resample_pos_embed(jnp.asarray(x), (grid, grid)), like.dtype)
  return sharding.put(x, like.sharding)


def start_from(state, imported):
  """`state` (a fresh TrainState) with the imported parts in the online and target networks.
  Each imported array is put as it is (float32 to float32: bit for bit)."""

  def put(tree, parts):
    return {**tree, **{p: jax.tree.map(_fit, parts[p], tree[p]) for p in parts if p in tree}}

  params, stats = imported["params"], imported["batch_stats"]
  return state.replace(params=put(state.params, params), batch_stats=put(state.batch_stats, stats),
                       target_params=put(state.target_params, params),
                       target_batch_stats=put(state.target_batch_stats, stats))

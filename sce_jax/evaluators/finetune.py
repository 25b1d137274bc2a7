"""Semi-supervised fine-tuning (docs/SCE.md section 9): SimCLR's protocol (Chen et al. 2020,
appendix B.5; google-research/simclr).

The whole trunk and a new linear head (zero-initialised, SimCLR's `zero_init_logits_layer`)
trained on a fraction of the labels: SGD with Nesterov momentum 0.9, lr 0.05 x batch / 256,
cosine to 0 without warmup, no weight decay; random resized crop (scale 0.08-1) and flip only;
BatchNorm in training mode on the global batch (SimCLR's global BN). 60 epochs on 1 % of the
labels, 30 on 10 %. ImageNet takes SimCLR's image lists (TFDS imagenet2012_subset/1pct,
/10pct, eval.finetune.subset); any class-folder or in-memory set a seeded per-class fraction
(eval.finetune.fraction). Top-1 and top-5 of the fine-tuned network on the eval split, in
inference mode.

A run of its own like pretraining (`loop.Run` in <workdir>/finetune_<subset>): sharded,
checkpointed, resumed exactly.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from sce_jax import loop, models, optim, sharding
from sce_jax.data import augment, pipeline, sources
from sce_jax.data.images import DataError
from sce_jax.data.presets import ViewSpec
from sce_jax.evaluators import common, supervised

# eval.finetune.subset: '' (eval.finetune.fraction of the training set), or SimCLR's ImageNet
# lists, TFDS imagenet2012_subset/<subset>.
SUBSETS = ("", "1pct", "10pct")


class Classifier(nn.Module):
  """The trunk of config.model and a new linear head on its float32 features."""
  model: Any
  num_classes: int

  def setup(self):
    self.trunk = models.make_trunk(self.model)
    self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)

  def __call__(self, x, train: bool = True):
    return self.head(self.trunk(x, train).astype(jnp.float32))


def label_fraction(labels, fraction, seed):
  """Sorted indices of `fraction` of the examples of each class (rounded, at least one),
  drawn with `seed`: a class-balanced labelled subset, as SimCLR's ImageNet lists are."""
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    chosen.append(rng.permutation(rows)[:max(1, round(fraction * len(rows)))])
  return np.sort(np.concatenate(chosen))


def train_source(config, splits):
  """The labelled training images and the run's name: SimCLR's ImageNet list
  eval.finetune.subset, or eval.finetune.fraction of each class of splits.train."""
  ft, data = config.eval.finetune, config.data
  if ft.subset and data.source != "tfds":
    raise DataError(
        f"eval.finetune.subset={ft.subset!r} is SimCLR's ImageNet list from TFDS "
        "(imagenet2012_subset) and needs data.source='tfds'; set --config.eval.finetune."
        "subset='' to take eval.finetune.fraction of your training set.")
  if ft.subset:
    return (sources.Tfds(f"imagenet2012_subset/{ft.subset}", data.train_split, data.data_dir),
            ft.subset)
  name = f"{100 * ft.fraction:g}pct"
  if ft.fraction == 1:
    return splits.train, name
  if isinstance(splits.train, sources.Tfds):
    raise DataError(
        f"eval.finetune.fraction={ft.fraction} needs a class-folder or in-memory training set; "
        "for ImageNet from TFDS set --config.eval.finetune.subset=1pct or 10pct (SimCLR's "
        "lists), or --config.eval.finetune.fraction=1.")
  return sources.subset(splits.train, label_fraction(splits.train.labels, ft.fraction,
                                                     config.seed)), name


def make_finetune_step(model, tx, lr_fn, view, data_cfg, mesh, key):
  """The jitted step(state, None, images, labels) -> (state, metrics) of fine-tuning, the
  supervised step (`supervised.make_step`) of the whole `model` with its BatchNorm training.

  state: {'step', 'params': {'trunk', 'head'}, 'batch_stats': {'trunk'}, 'opt_state'}. The
  uint8 crops are flipped and normalised in the step.
  """

  def apply_fn(params, batch_stats, x):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  def inputs_fn(_, key, images):
    return augment.augment_view(key, images, view, data_cfg.mean, data_cfg.std)

  return supervised.make_step(apply_fn, tx, lr_fn, inputs_fn, mesh, key)


def init(tx, dim, num_classes):
  """trunk_variables -> a fresh state: the pretrained trunk (copied: the state is donated) and
  a zero head."""

  def fn(trunk_variables):
    params = {"trunk": jax.tree.map(jnp.copy, trunk_variables["params"]),
              "head": {"kernel": jnp.zeros((dim, num_classes)), "bias": jnp.zeros(num_classes)}}
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "batch_stats": {"trunk": jax.tree.map(jnp.copy, trunk_variables["batch_stats"])},
            "opt_state": tx.init(params)}
  return fn


def evaluate(config, trunk_variables, mesh, splits, workdir):
  """Fine-tunes the trunk on the labelled subset (`train_source`) in
  <workdir>/finetune_<subset> (`loop.Run`: checkpoints, metrics.jsonl; a preemption or Ctrl-C
  raises preemption.Preempted after saving; run again on the same weights, it resumes exactly)
  and returns finetune_top1 / finetune_top5 on splits.eval."""
  ft, data = config.eval.finetune, config.data
  train, name = train_source(config, splits)
  view = ViewSpec(data.image_size, scale=(0.08, 1.0), jitter=0.0, gray=0.0)
  steps_per_epoch = max(train.num_examples // ft.batch_size, 1)
  total_steps = int(ft.epochs * steps_per_epoch)
  lr_fn = optax.cosine_decay_schedule(optim.scaled_lr(ft.base_lr, ft.batch_size), total_steps)
  tx = optim.sgd(lr_fn, weight_decay=0.0, momentum=ft.momentum, nesterov=True)
  model = Classifier(config.model, splits.num_classes)
  dim = models.feature_dim(config.model)
  key = jax.random.key(config.seed)
  rundir = epath.Path(workdir) / f"finetune_{name}"
  common.pin_trunk(rundir, trunk_variables, "a fine-tuning run")
  step = make_finetune_step(model, tx, lr_fn, view, data, mesh, key)
  fresh = jax.jit(init(tx, dim, splits.num_classes), out_shardings=sharding.replicated(mesh))
  num_steps = loop.last_step(total_steps, ft.max_steps)
  with loop.Run(rundir, config.checkpoint, what="fine-tuning", num_steps=num_steps,
                batch_size=ft.batch_size, log_every=config.log_every_steps,
                prefix="finetune_") as run:
    state, start, _ = run.restore(lambda _: fresh(trunk_variables), key)
    batches = pipeline.train_iterator(train, data, global_batch_size=ft.batch_size,
                                      views=(view,), seed=config.seed, start_step=start,
                                      sharding=sharding.rows(mesh))
    state = run.train(state, start, lambda s, b: step(s, None, b["views"][0], b["label"]),
                      batches)

  tuned = {"params": state["params"]["trunk"], "batch_stats": state["batch_stats"]["trunk"]}
  feats, labels = common.extract_features(models.make_trunk(config.model), tuned, splits.eval,
                                          data, batch_size=config.eval.batch_size, mesh=mesh)
  top1, top5 = supervised.head_accuracy(state["params"]["head"], feats, labels)
  return {"finetune_top1": top1, "finetune_top5": top5}
